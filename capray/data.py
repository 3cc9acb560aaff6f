"""Caption datasets: COCO, Flickr8k-style CSV and captions tables (`data.format=table`), plus the seed's split.

Every reader returns a DataFrame with `image` (a full local path or URI) and `caption`, in file
order. Bad input is an error that names the file and the problem, never a silent drop.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage

if TYPE_CHECKING:
    from capray.schema import Config


class DataError(ValueError):
    """Unusable caption data; the message names the file and what is wrong with it."""


def _read_bytes(uri: str, storage_cfg: Any) -> bytes:
    try:
        return storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None


def _read_text(uri: str, storage_cfg: Any) -> str:
    raw = _read_bytes(uri, storage_cfg)
    try:
        # utf-8-sig: files saved by Windows tools start with a BOM, which json.loads rejects.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not valid UTF-8 (byte offset {e.start})") from None


def _dirname(uri: str) -> str:
    return storage.dirname(uri) or "."


def _finish(df: pd.DataFrame, source: str, images: str) -> pd.DataFrame:
    missing = [c for c in ("image", "caption") if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))})")
    df = df[["image", "caption"]].copy()
    df["caption"] = df["caption"].fillna("").astype(str).str.strip()
    df["image"] = df["image"].fillna("").astype(str).str.strip()
    empty = df.index[(df["caption"] == "") | (df["image"] == "")]
    if len(empty):
        raise DataError(
            f"{source}: {len(empty)} row(s) with an empty image or caption, first at data row {empty[0] + 1}"
        )
    df["image"] = [storage.resolve(name, images) for name in df["image"]]
    return df.reset_index(drop=True)


def read_coco(annotations: str, images: str, storage_cfg: Any = None) -> pd.DataFrame:
    """COCO captions JSON (`images` + `annotations`, as captions_train2014.json)."""
    try:
        data = json.loads(_read_text(annotations, storage_cfg))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        rows = []
        for ann in data["annotations"]:
            if ann["image_id"] not in files:
                raise DataError(
                    f"{annotations}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                    "which is not in 'images'"
                )
            rows.append((files[ann["image_id"]], ann["caption"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{annotations}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return _finish(pd.DataFrame(rows, columns=["image", "caption"]), annotations, images)


def _read_table(uri: str, storage_cfg: Any) -> pd.DataFrame:
    if uri.lower().endswith(".parquet"):
        try:
            return pq.read_table(io.BytesIO(_read_bytes(uri, storage_cfg))).to_pandas()
        except pa.ArrowException as e:
            raise DataError(f"{uri}: not a readable Parquet file ({e})") from None
    text = _read_text(uri, storage_cfg)
    try:
        with warnings.catch_warnings():
            # Without index_col=False a first row with one field too many (an unquoted comma in a
            # caption) silently becomes an index and shifts every column; with it pandas truncates
            # the row and only warns. Both lose data, so the warning is an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError) as e:
        raise DataError(f"{uri}: malformed CSV ({str(e).strip()})") from None


def read_flickr(annotations: str, images: str, storage_cfg: Any = None) -> pd.DataFrame:
    """Flickr8k/30k CSV with header `image,caption`; names resolved against `images`."""
    return _finish(_read_table(annotations, storage_cfg), annotations, images)


def read_table(path: str, images: str = "", storage_cfg: Any = None) -> pd.DataFrame:
    """A captions table (`data.format=table`): CSV or Parquet with `image` (path or URI) and
    `caption`; relative paths resolved against `images`, or the table's own folder."""
    return _finish(_read_table(path, storage_cfg), path, images or _dirname(path))


def require_annotations(cfg: Config) -> None:
    """DataError unless the configured captions file is given and exists."""
    if not cfg.data.annotations:
        raise DataError(f"data.annotations is empty: give the {cfg.data.format} captions file")
    if not storage.exists(cfg.data.annotations, cfg.storage):
        raise DataError(f"data.annotations: file not found: {cfg.data.annotations}")


def read_captions(cfg: Config) -> pd.DataFrame:
    """The configured dataset's captions (`data.format`, `data.annotations`, `data.images`)."""
    ann, fmt = cfg.data.annotations, cfg.data.format
    if not ann:
        require_annotations(cfg)
    # Synthetic and Flickr layouts keep their photos in images/ beside the captions file.
    images = cfg.data.images or storage.join(_dirname(ann), "images")
    if fmt == "coco":
        return read_coco(ann, cfg.data.images, cfg.storage)
    if fmt in ("flickr", "synthetic"):
        return read_flickr(ann, images, cfg.storage)
    return read_table(ann, cfg.data.images, cfg.storage)


def sample_split(
    df: pd.DataFrame, num_examples: int, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The seed's sampling: `num_examples` random captions (0 = all), then train/val split by image."""
    rng = np.random.default_rng(seed)
    if 0 < num_examples < len(df):
        df = df.iloc[np.sort(rng.choice(len(df), num_examples, replace=False))]
    images = df["image"].unique()
    if len(images) < 2:
        raise DataError(f"need at least 2 distinct images to split, got {len(images)}")
    order = rng.permutation(len(images))
    n_val = min(max(1, math.ceil(val_fraction * len(images))), len(images) - 1)
    val_images = set(images[order[:n_val]])
    is_val = df["image"].isin(val_images)
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)


def save_split(train: pd.DataFrame, val: pd.DataFrame, uri: str, storage_cfg: Any = None) -> None:
    """One Parquet file (image, caption, split), written atomically."""
    both = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(both[["image", "caption", "split"]], preserve_index=False), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)


def load_split(uri: str, storage_cfg: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inverse of `save_split`."""
    df = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_cfg))).to_pandas()
    pick = lambda name: df[df["split"] == name][["image", "caption"]].reset_index(drop=True)
    return pick("train"), pick("val")


def prepare_split(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's split: reused from `<work_dir>/split.parquet` if present, else sampled and saved."""
    from capray.config import output_paths

    uri = output_paths(cfg)["split"]
    if storage.exists(uri, cfg.storage):
        return load_split(uri, cfg.storage)
    train, val = sample_split(read_captions(cfg), cfg.data.num_examples, cfg.data.val_fraction, cfg.data.seed)
    save_split(train, val, uri, cfg.storage)
    return train, val
