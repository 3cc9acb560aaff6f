"""The image jobs' Ray Data callable classes share this base: a user's batch in, model rows out.

`ImageBatchModel` takes the job pipeline's decoded batch or a user's own Ray Data batch (a `pixels`
column, or a column of image bytes, URIs, PIL images or arrays, decoded here, a bad image becoming
an error row); subclasses (capray.extraction.FeatureExtractor, capray.captioning.CaptionPredictor)
say what rows the model makes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from capray import storage
from capray.images import EMPTY_PATH, IMAGE_SIZE, ImageDecodeError, decode


def to_pixels(item: Any, storage_cfg: Any, max_pixels: int) -> np.ndarray:
    """One image as a path/URI, encoded bytes, a PIL image or a uint8 array -> (299, 299, 3) uint8,
    as the jobs decode it; ImageDecodeError for a bad image, TypeError for an unsupported type."""
    from PIL import Image

    from capray.images import from_pil

    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not path.strip():
            raise ImageDecodeError(EMPTY_PATH)
        return decode(storage.read_bytes(path, storage_cfg), max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode(bytes(item), max_pixels)
    if isinstance(item, Image.Image):
        return from_pil(item, max_pixels)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise TypeError(
                f"unsupported array of dtype {item.dtype} and shape {item.shape}: expected uint8 (H, W[, 3|4])"
            )
        return from_pil(Image.fromarray(item), max_pixels)
    raise TypeError(f"unsupported image type {type(item).__name__}: expected {IMAGE_TYPES}")


IMAGE_TYPES = "a path or URI (str), encoded image bytes (JPEG, PNG, ...), a PIL image or a uint8 array (H, W[, 3|4])"


class ImageBatchModel:
    """Base of the image jobs' Ray Data callables (FeatureExtractor, CaptionPredictor).

    A batch is either the job pipeline's {image (key), pixels (B, 299, 299, 3) uint8, error}, or
    a user's own Ray Data batch: a `pixels` column, or an `image_column` of image bytes, URIs or
    arrays (decoded here, a bad image becoming an error row). The result is the model's columns
    (`rows`) followed by the batch's other columns (a name the model uses gets an `input_` prefix).
    """

    image_column = "image"
    storage_cfg: Any = None
    max_pixels: int  # data.max_pixels, set by the subclass's constructor

    def rows(self, keys: list[str | None], pixels: np.ndarray, errors: list[str]) -> pa.Table:
        """The model's rows for decoded images (`errors[i]` non-empty: no image, an error row)."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        if "pixels" in batch:
            n = len(batch["pixels"])
            pixels = np.asarray(batch["pixels"]) if _decoded(batch["pixels"]) else None
            errors = [e or "" for e in batch["error"]] if "error" in batch else [""] * n
            if pixels is None:  # a user's pixels column of other sizes: resized as a decoded image would be
                pixels, errors = self._decode(batch["pixels"], errors)
            keys = list(batch["image"]) if "image" in batch and _strings(batch["image"]) else [None] * n
            consumed = {"pixels", "error", "image"}
        else:
            if self.image_column not in batch:
                raise KeyError(
                    f"batch has no `{self.image_column}` or `pixels` column (columns: {', '.join(batch)}); "
                    "set image_column= to the column of image bytes or URIs"
                )
            items = list(batch[self.image_column])
            pixels, errors = self._decode(items, [""] * len(items))
            keys = items if _strings(items) else [None] * len(items)
            consumed = {self.image_column}
        out = self.rows(keys, pixels, errors)
        for name, column in batch.items():
            if name not in consumed:
                out = out.append_column(f"input_{name}" if name in out.column_names else name, pa.array(list(column)))
        return out

    def _decode(self, items: list[Any], errors: list[str]) -> tuple[np.ndarray, list[str]]:
        pixels = np.zeros((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for i, item in enumerate(items):
            if errors[i]:
                continue
            try:
                pixels[i] = to_pixels(item, self.storage_cfg, self.max_pixels)
            except (ImageDecodeError, TypeError) as e:
                errors[i] = str(e)
            except OSError as e:
                errors[i] = f"cannot read file: {e}"
        return pixels, errors


def _decoded(column: Any) -> bool:
    return (
        isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    )


def _strings(column: Any) -> bool:
    return all(isinstance(v, str) for v in column)
