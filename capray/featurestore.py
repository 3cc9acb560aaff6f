"""The feature store: the on-disk contract between extraction (writer) and training and
evaluation (readers).

A features folder holds one Parquet file per input shard and its file list, `_files.json`
(`_manifest.json` in folders of earlier builds, still read). One row per image:
`image` (URI or key), `features` (raw bytes of the (64, 2048) array), `dtype`, `shape`, `error`,
then the input's own columns (e.g. `caption`). Raw bytes keep the files readable by plain
pyarrow/numpy without Ray's tensor extension types. No TensorFlow here: Ray Data runs these
functions in its own worker processes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from capray import shards, storage
from capray.images import FEATURE_DIM, NUM_CELLS
from capray.runtime import footer_readers_for

if TYPE_CHECKING:
    from capray.text import Tokenizer

FEATURE_SHAPE = (NUM_CELLS, FEATURE_DIM)
# Images per task that pairs features with captions: each such batch reads the split file's row
# groups of its image range once.
CAPTION_BATCH = 256
# Explicit, so that a batch whose `error` values are all null still writes a string column.
SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("features", pa.binary()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)


class FeatureError(ValueError):
    """A features folder or shard that cannot be used; the message names the file."""


def _check_size(blob: bytes, dtype: str) -> None:
    expected = int(np.prod(FEATURE_SHAPE)) * np.dtype(dtype).itemsize
    if len(blob) != expected:
        raise FeatureError(f"feature row of {len(blob)} bytes, expected {expected} ({dtype} {FEATURE_SHAPE})")


def decode_features(column: Iterable[bytes], dtype: str, as_stored: bool = False) -> np.ndarray:
    """Parquet `features` bytes -> (N, 64, 2048) float32, or in the stored dtype with `as_stored`
    (never unpickles: raw buffers only)."""
    rows = []
    for b in column:
        _check_size(b, dtype)
        rows.append(np.frombuffer(b, dtype=dtype))
    out = np.stack(rows).reshape(-1, *FEATURE_SHAPE)
    return out if as_stored else out.astype(np.float32)


FILE_LIST = "_files.json"
# Its name in earlier builds, when "manifest" also meant a captions table and an input kind.
OLD_FILE_LIST = "_manifest.json"


def file_list_uri(features_dir: str, storage_cfg: Any) -> str | None:
    """Where the features folder's file list is (either name), None if it has none."""
    for name in (FILE_LIST, OLD_FILE_LIST):
        uri = storage.join(features_dir, name)
        if storage.exists(uri, storage_cfg):
            return uri
    return None


def read_file_list(features_dir: str, storage_cfg: Any) -> dict[str, Any] | None:
    """The features folder's file list (every Parquet file with its row count), None if it has none."""
    uri = file_list_uri(features_dir, storage_cfg)
    return json.loads(storage.read_bytes(uri, storage_cfg)) if uri else None


def _footer_rows(uri: str, storage_cfg: Any) -> int:
    fs, path = storage.filesystem(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise FeatureError(f"{uri}: not a readable Parquet file ({e}); delete it and re-run `capray extract`") from None


def write_file_list(
    features_dir: str,
    storage_cfg: Any,
    dtype: str,
    previous: dict[str, Any] | None = None,
    written: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`_files.json` in the features folder: every Parquet file with its row count.

    Counts come from `previous` (the file list before this run) and `written` (what this run's
    workers reported); only a file in neither (e.g. written by a killed run) is opened, for its
    footer (in parallel): O(shards), never O(images).
    """
    known = {f["file"]: f["rows"] for f in (previous or {}).get("files", [])}
    known.update(written or {})
    names = sorted(n for n in shards.done_ids(features_dir, storage_cfg))
    names = [shards.output_name(n) for n in names]
    new = [n for n in names if n not in known]
    counts = ThreadPoolExecutor(16).map(lambda n: _footer_rows(storage.join(features_dir, n), storage_cfg), new)
    known.update(zip(new, counts))
    files = [{"file": n, "rows": known[n]} for n in names]
    file_list = {
        "format": "capray-features/1",
        "columns": SCHEMA.names,
        "shape": list(FEATURE_SHAPE),
        "dtype": dtype,
        "rows": sum(f["rows"] for f in files),
        # A new version of the file at every extraction, even with the same files: S3's ETag is a
        # digest of the content, and training's statistics are kept for one version of this file
        # (capray.train.job.prepare_feature_stats); a retry of failed rows keeps every name and count.
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "files": files,
    }
    storage.write_bytes(storage.join(features_dir, FILE_LIST), json.dumps(file_list, indent=1).encode(), storage_cfg)
    old = storage.join(features_dir, OLD_FILE_LIST)
    if storage.exists(old, storage_cfg):  # superseded by the file list just written
        storage.delete(old, storage_cfg)
    return file_list


def verify(features_dir: str, storage_cfg: Any = None) -> None:
    """Fail before training starts, naming the file, if a shard is unreadable or disagrees with
    the file list, or if an unfinished `capray extract` is still replacing files of an input
    that changed (their images would be read twice; a partial extraction, e.g. `--limit`, is fine).
    Reads Parquet footers only, not the features."""
    listed = {f["file"]: f["rows"] for f in (read_file_list(features_dir, storage_cfg) or {}).get("files", [])}
    present = {shards.output_name(i) for i in shards.done_ids(features_dir, storage_cfg)}
    missing = sorted(set(listed) - present)
    if missing:
        raise FeatureError(f"{features_dir}: shard(s) listed in its file list are missing: {', '.join(missing)}")
    entries, _ = shards.read_index(features_dir, storage_cfg)
    replaced = sorted({shards.output_name(e["id"]) for e in entries if e.get("state") == "superseded"} & present)
    if replaced:
        raise FeatureError(
            f"{features_dir}: an unfinished `capray extract` is replacing {len(replaced)} shard files of an input "
            f"that changed (e.g. {replaced[0]}), whose images would be read twice: re-run `capray extract` "
            "with the same config"
        )
    files = [storage.join(features_dir, name) for name in sorted(present)]
    for f, rows in zip(files, ThreadPoolExecutor(16).map(lambda f: _footer_rows(f, storage_cfg), files)):
        name = f.rsplit("/", 1)[-1]
        if name in listed and listed[name] != rows:
            raise FeatureError(f"{f}: {rows} rows, its file list says {listed[name]}; re-run `capray extract`")


def _check_sizes(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the `path` column, first checking every row's feature size so that a corrupt shard
    is named here rather than failing as a reshape error deep in a training worker."""
    for path, image, blob, dtype in zip(batch["path"], batch["image"], batch["features"], batch["dtype"]):
        try:
            _check_size(blob, dtype)
        except (FeatureError, TypeError) as e:
            raise FeatureError(f"{path}: image {image}: {e}") from None
    return {k: v for k, v in batch.items() if k != "path"}


def read_features(features_dir: str, storage_cfg: Any = None) -> ray.data.Dataset:
    """The extracted features as a Ray Dataset (successful rows only, sizes checked)."""
    fs, path = storage.filesystem(features_dir, storage_cfg)
    file_list = read_file_list(features_dir, storage_cfg)  # None after an extraction killed before its end
    with footer_readers_for(len(file_list["files"]) if file_list else None):
        ds = ray.data.read_parquet(path, filesystem=fs, include_paths=True)
    return ds.filter(expr=col("error").is_null()).map_batches(_check_sizes, batch_size=64)


# --- the training view: features paired with their captions from the split file, and statistics


def pair_captions(
    batch: dict[str, Any], split_uri: str, storage_cfg: Any, side: str, tokenizer: Tokenizer
) -> dict[str, Any]:
    """One row per (image, caption) of the batch's images on one side of the split: each image's
    feature bytes repeated for each of its captions, read from the split file by this task."""
    from capray.data import captions_of

    found = captions_of(batch["image"], split_uri, storage_cfg, side)
    by_image: dict[str, list[str]] = {}
    for image, caption in zip(found["image"].to_pylist(), found["caption"].to_pylist()):
        by_image.setdefault(image, []).append(caption)
    feats, caps = [], []
    for image, blob in zip(batch["image"], batch["features"]):
        for caption in by_image.get(image, ()):
            feats.append(blob)
            caps.append(caption)
    return {
        "features": np.array(feats, dtype=object),
        "captions": tokenizer.encode_batch(caps),
        # One dtype per features folder (capray.extraction.extract refuses to mix them).
        "dtype": np.array(list(batch["dtype"][:1]) * len(feats), dtype=object),
    }


def caption_dataset(
    features: ray.data.Dataset, split_uri: str, storage_cfg: Any, side: str, tokenizer: Tokenizer
) -> ray.data.Dataset:
    """Features of the images on one side of the split, one row per caption with its padded
    token ids. Each task reads its images' captions from the split file and tokenises them:
    what a task receives besides its block is the split's URI and the tokenizer, whatever the
    number of captions."""
    fn = partial(pair_captions, split_uri=split_uri, storage_cfg=storage_cfg, side=side, tokenizer=tokenizer)
    return features.map_batches(fn, batch_size=CAPTION_BATCH)


def _on_side(batch: dict[str, Any], split_uri: str, storage_cfg: Any, side: str) -> dict[str, Any]:
    from capray.data import captions_of

    there = set(captions_of(batch["image"], split_uri, storage_cfg, side)["image"].to_pylist())
    keep = np.array([image in there for image in batch["image"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def side_features(features: ray.data.Dataset, split_uri: str, storage_cfg: Any, side: str) -> ray.data.Dataset:
    """The feature rows of the images with a caption on one side of the split (one row each)."""
    fn = partial(_on_side, split_uri=split_uri, storage_cfg=storage_cfg, side=side)
    return features.map_batches(fn, batch_size=CAPTION_BATCH)


def _partial_moments(batch: dict[str, Any]) -> dict[str, Any]:
    x = decode_features(batch["features"], batch["dtype"][0]).reshape(-1, FEATURE_SHAPE[1]).astype(np.float64)
    return {"n": np.array([len(x)]), "s": x.sum(0)[None], "ss": (x * x).sum(0)[None]}


def feature_stats(features: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and std over every cell of every image, in one streaming pass, and the
    number of images (none: a mean of 0, a std of 1 and 0 images)."""
    n, s, ss = 0, np.zeros(()), np.zeros(())
    for part in features.map_batches(_partial_moments, batch_size=64).iter_batches(batch_size=None):
        n += part["n"].sum()
        s = s + part["s"].sum(0)
        ss = ss + part["ss"].sum(0)
    if not n:
        return np.zeros(FEATURE_SHAPE[1], np.float32), np.ones(FEATURE_SHAPE[1], np.float32), 0
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32), int(n) // FEATURE_SHAPE[0]
