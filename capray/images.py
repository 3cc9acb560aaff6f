"""Image bytes -> 299x299 RGB uint8 arrays, shared by feature extraction and captioning.

Both jobs must decode identically, or the caption job would see different features from the
ones the model was trained on.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

# InceptionV3's input size, and what it makes of it: an 8x8 grid (64 attention cells) of 2048
# channels. Defined here, not in capray.model, so that decoding tasks and the feature store's
# readers never import TensorFlow.
IMAGE_SIZE = 299
NUM_CELLS = 64
FEATURE_DIM = 2048


# Images between data.max_pixels and twice that only make PIL warn; decode() refuses them itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message is the reason recorded in outputs."""


# A manifest row or API item whose image path/URI is empty or blank: read, it would name the
# working directory (a local path) or a bucket's root, never an image.
EMPTY_PATH = "empty image path/URI"
# Why an image failed, as the per-shard stats and `capray status` count it (docs/outputs.md#per-shard-stats).
# Ordered: the first class whose marker is in the error message wins.
ERROR_CLASSES = (
    ("empty", ("empty file", EMPTY_PATH)),
    ("not_found", ("not found:", "No such file", "does not exist")),
    ("too_large", ("image too large",)),
    ("truncated", ("truncated", "broken data stream", "premature end")),
    ("not_an_image", ("cannot identify image file", "no image member", "unsupported image type")),
    ("storage", ("cannot read file:",)),
    ("decode", ("cannot decode image", "cannot convert image")),
)
# A Python object's repr (`<_io.BytesIO object at 0x7f4a...>`) or a bare address: they make every
# error message unique, so no two could be counted or grouped as one.
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+")


def error_class(message: str | None) -> str:
    """The class of a failed image's error message (ERROR_CLASSES), "other" when none matches."""
    if not message:
        return "other"
    for name, markers in ERROR_CLASSES:
        if any(m in message for m in markers):
            return name
    return "other"


def clean_message(message: str) -> str:
    """An error message without memory addresses or object reprs."""
    return _ADDRESS.sub("", message)


def decode(data: bytes, max_pixels: int, draft: bool = True) -> np.ndarray:
    """Decode image bytes to (299, 299, 3) uint8 RGB, honouring EXIF orientation.

    `draft=False` decodes JPEGs at full size (benchmarks and tests compare the two).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    # PIL's own bomb check runs inside Image.open (an error above twice its limit): make it use
    # ours. Below that PIL only warns; the explicit check below refuses instead. (Not through
    # warnings.catch_warnings: it swaps process-wide filters, a race between decode threads.)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"image too large: {e}") from None
        if img.width * img.height > max_pixels:
            raise ImageDecodeError(
                f"image too large: {img.width}x{img.height} = {img.width * img.height} pixels exceeds data.max_pixels={max_pixels}"
            )
        # Only the header has been read so far: a huge image is refused above without
        # its pixels ever being allocated.
        if draft and img.format == "JPEG":
            # libjpeg's DCT scaling: decode at 1/2, 1/4 or 1/8 size, the smallest still >= 299
            # on both sides (no-op below 598 px). A 12 MP photo decodes ~6x faster, and after
            # the resize its pixels are within ~0.7/255 on average of a full decode
            # (tests/test_images.py, bench/decode.py, docs/performance.md).
            img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        img.load()
        return _to_pixels(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError... for bad files)
        raise ImageDecodeError(clean_message(f"cannot decode image: {type(e).__name__}: {e}")) from None


def from_pil(img: Image.Image, max_pixels: int) -> np.ndarray:
    """A PIL image already in memory -> (299, 299, 3) uint8 RGB, as `decode` treats decoded files."""
    if img.width * img.height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {img.width}x{img.height} = {img.width * img.height} pixels exceeds {max_pixels}"
        )
    try:
        return _to_pixels(img.copy())  # the caller's image is left as it was
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 (as in decode: PIL's errors have no common base)
        raise ImageDecodeError(clean_message(f"cannot convert image: {type(e).__name__}: {e}")) from None


def _to_8_bits(img: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF, PGM: PIL's I;16 modes, or I holding 16-bit values) -> L by its
    top 8 bits, as TensorFlow's decode_png(dtype=uint8) reads it. PIL's convert() would clip
    every value above 255 to white."""
    values = np.asarray(img)
    if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDecodeError(
            f"cannot decode image: 32-bit integer pixels from {values.min()} to {values.max()} have no "
            "defined 8-bit range; save it with 8 or 16 bits per channel"
        )
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L")


def _to_pixels(img: Image.Image) -> np.ndarray:
    # In place, and convert() only when needed (below): their copies of every image
    # were about a fifth of the decode time.
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are shown as on a white page, not as their hidden colour.
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _to_8_bits(img)
    elif img.mode == "F":
        raise ImageDecodeError(
            "cannot decode image: 32-bit floating-point pixels (mode F) have no defined 8-bit range; "
            "save it with 8 or 16 bits per channel"
        )
    if img.mode != "RGB":  # L, P, CMYK ...; convert() would copy an RGB image too
        img = img.convert("RGB")
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
