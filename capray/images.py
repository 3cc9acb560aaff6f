"""Image bytes -> 299x299 RGB uint8 arrays, shared by feature extraction and captioning.

Both jobs must decode identically, or the caption job would see different features from the
ones the model was trained on.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from capray import storage

# InceptionV3's input size, and what it makes of it: an 8x8 grid (64 attention cells) of 2048
# channels. Defined here, not in capray.model, so that decoding tasks and the feature store's
# readers never import TensorFlow.
IMAGE_SIZE = 299
NUM_CELLS = 64
FEATURE_DIM = 2048


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message is the reason recorded in outputs."""


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to (299, 299, 3) uint8 RGB, honouring EXIF orientation."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    # PIL's own bomb check runs inside Image.open: make it use our limit, not its 89 Mpx default.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                raise ImageDecodeError(f"image too large: {e}") from None
            # Only the header has been read so far: a huge image is refused above without
            # its pixels ever being allocated.
            img.load()
            # In place, and convert() only when needed (below): their copies of every image
            # were about a fifth of the decode time.
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Transparent pixels are shown as on a white page, not as their hidden colour.
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            if img.mode != "RGB":  # L, P, CMYK, I;16 ...; convert() would copy an RGB image too
                img = img.convert("RGB")
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return np.asarray(img, dtype=np.uint8)


def load_batch(batch: dict[str, Any], storage_cfg: Any, max_pixels: int) -> dict[str, Any]:
    """Ray Data batch fn: {image: URIs} -> {image, pixels (B, 299, 299, 3) uint8, error}.

    A file that cannot be read or decoded keeps its row, with zero pixels and the reason in
    `error`, so that every input image is accounted for downstream. `error` is "" on success:
    an all-None object column would not survive Ray's Arrow conversion as strings.
    """
    uris = [str(u) for u in batch["image"]]
    pixels = np.zeros((len(uris), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    errors: list[str] = []
    for i, uri in enumerate(uris):
        try:
            pixels[i] = decode(storage.read_bytes(uri, storage_cfg), max_pixels)
            errors.append("")
        except ImageDecodeError as e:
            errors.append(str(e))
        except OSError as e:
            errors.append(f"cannot read file: {e}")
    return {"image": np.array(uris, dtype=object), "pixels": pixels, "error": np.array(errors, dtype=object)}
