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
from capray.model import IMAGE_SIZE

# Default limit: 8K x 8K. Anything above is refused before the pixels are decoded.
MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message is the reason recorded in outputs."""


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to (299, 299, 3) uint8 RGB, honouring EXIF orientation."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # Header only so far: refuse huge images before allocating their pixels.
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(f"image too large: {img.width}x{img.height} pixels > limit {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            # Handles L, LA, P, RGBA, CMYK, I;16 ...: alpha is dropped (composited on nothing).
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return np.asarray(img, dtype=np.uint8)


def load_batch(batch: dict[str, Any], storage_cfg: Any = None, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
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
