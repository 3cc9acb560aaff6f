"""Caption datasets: COCO, Flickr8k-style CSV and captions tables (`data.format=table`), plus the seed's split.

Every reader returns a DataFrame with `image` (a full local path or URI) and `caption`, in file
order. Bad input is an error that names the file and the problem, never a silent drop.

The split file (`split.parquet`) is made by a Ray task and read by Ray tasks: the training
driver holds its URI, counts and the vocabulary, never the captions.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capray import storage

if TYPE_CHECKING:
    from capray.schema import Config
    from capray.text import Tokenizer

log = logging.getLogger(__name__)


# A line of the Flickr datasets' own token files: `1000268201_693b08cb0e.jpg#0<TAB>A child in ...`.
_TOKEN_LINE = re.compile(r"^([^\t]+)#\d+\t(.*)$")


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
    return _read_csv(uri, _read_text(uri, storage_cfg))


def _read_csv(uri: str, text: str) -> pd.DataFrame:
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
    """Flickr8k/30k captions, names resolved against `images`: a CSV with header `image,caption`
    (Kaggle's captions.txt), or the datasets' own token file (`Flickr8k.token.txt`,
    `results_20130124.token`: `<image>#<n><TAB><caption>` per line)."""
    if annotations.lower().endswith(".parquet"):
        return _finish(_read_table(annotations, storage_cfg), annotations, images)
    text = _read_text(annotations, storage_cfg)
    if not _TOKEN_LINE.match(text.split("\n", 1)[0].rstrip("\r")):
        return _finish(_read_csv(annotations, text), annotations, images)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            match = _TOKEN_LINE.match(line)
            if match is None:
                raise DataError(f"{annotations}: line {number} is not <image>#<n><TAB><caption>, as the first line is")
            rows.append(match.groups())
    return _finish(pd.DataFrame(rows, columns=["image", "caption"]), annotations, images)


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


# A split file's rows are sorted by image in row groups of this many rows: a batch of features
# reads only the row groups whose image range it overlaps (Parquet statistics), and the
# vocabulary is counted in ranges of row groups, one per Ray task.
SPLIT_ROW_GROUP = 4096
# Row groups per task of the vocabulary count (65,536 captions): fewer, larger tasks keep the
# driver's bookkeeping small next to the captions.
VOCAB_GROUPS = 16
VOCAB_PARTITIONS = 4
SPLIT_COLUMNS = ["image", "caption", "split"]


# The split file's key-value metadata: the number of captions on each side, so that a training
# run reads two numbers from the footer instead of counting the `split` column (files written
# before it lack the key and are counted by Ray Data: `split_rows`).
SPLIT_ROWS_KEY = b"capray.split_rows"
# What the split was made from (`split_source`), so that a later run can say when the captions
# file or the data.* keys have changed since: the split itself is never made again.
SPLIT_SOURCE_KEY = b"capray.split_source"


def save_split(
    train: pd.DataFrame, val: pd.DataFrame, uri: str, storage_cfg: Any = None, source: dict[str, Any] | None = None
) -> None:
    """One Parquet file (image, caption, split), sorted by image, written atomically; `source`
    (what it was made from) in its footer."""
    both = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    # Stable: an image's captions keep their order in the captions file.
    both = both.sort_values("image", kind="stable", ignore_index=True)
    table = pa.Table.from_pandas(both[SPLIT_COLUMNS], preserve_index=False)
    rows = json.dumps({"train": len(train), "val": len(val)}).encode()
    meta = {**(table.schema.metadata or {}), SPLIT_ROWS_KEY: rows}
    if source is not None:
        meta[SPLIT_SOURCE_KEY] = json.dumps(source).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=SPLIT_ROW_GROUP)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)


def load_split(uri: str, storage_cfg: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A split file as two DataFrames (train, val), in file order; any capray's split file."""
    df = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_cfg))).to_pandas()
    pick = lambda name: df[df["split"] == name][["image", "caption"]].reset_index(drop=True)
    return pick("train"), pick("val")


def load_side(uri: str, storage_cfg: Any, side: str) -> pd.DataFrame:
    """One side's (image, caption) rows of a split file, in file order: only that side is read
    (the filter on `split` is pushed down to the Parquet read); any capray's split file."""
    fs, path = storage.filesystem(uri, storage_cfg)
    table = pq.read_table(path, filesystem=fs, columns=["image", "caption"], filters=pc.field("split") == side)
    return table.to_pandas()


def make_split(cfg: Config, uri: str) -> dict[str, int]:
    """Ray task: read the captions, sample and split them, write the split file; returns the
    number of captions on each side (the driver never holds the captions)."""
    source = split_source(cfg)  # before the read: a file rewritten meanwhile shows as changed
    train, val = sample_split(read_captions(cfg), cfg.data.num_examples, cfg.data.val_fraction, cfg.data.seed)
    save_split(train, val, uri, cfg.storage, source)
    return {"train": len(train), "val": len(val)}


def split_source(cfg: Config) -> dict[str, Any]:
    """What a split is made from: the `data.*` keys that decide it, and the captions file's
    version (`<size>:<ETag, generation or mtime>`)."""
    from capray.listing import stat

    d = cfg.data
    keys = ["format", "annotations", "images", "num_examples", "val_fraction", "seed"]
    if d.format == "synthetic":
        keys += ["synthetic_images", "synthetic_seed"]
    source: dict[str, Any] = {f"data.{k}": getattr(d, k) for k in keys}
    if d.annotations:
        try:
            size, version = stat(d.annotations, cfg.storage)
            source["annotations_version"] = f"{size}:{version}"
        except OSError:
            pass  # read_captions names a missing file
    return source


def split_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data a split was made from differs from the config's now (`split_source`s). A key
    unset now (the synthetic captions file, generated by `capray extract`) is not compared."""
    changes = [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k.startswith("data.") and k in saved and now[k] not in ("", None) and saved[k] != now[k]
    ]
    same_file = saved.get("data.annotations") == now.get("data.annotations")
    if same_file and "annotations_version" in now and saved.get("annotations_version") != now["annotations_version"]:
        changes.append("data.annotations: the file has changed since")
    return changes


def prepare_split(cfg: Config) -> str:
    """The run's split file: `<work_dir>/split.parquet` if present (also one an earlier capray
    wrote), else made and written by a Ray task. Returns its URI."""
    import ray

    from capray.config import output_paths

    uri = output_paths(cfg)["split"]
    if storage.exists(uri, cfg.storage):
        fs, path = storage.filesystem(uri, cfg.storage)
        with fs.open_input_file(path) as handle:
            saved = pq.ParquetFile(handle).schema_arrow.metadata or {}
        if SPLIT_SOURCE_KEY in saved:  # a split file of an earlier capray does not say
            changes = split_changes(json.loads(saved[SPLIT_SOURCE_KEY]), split_source(cfg))
            if changes:
                log.warning(
                    f"{uri} is reused as it is, though the data it was made from differs now ({'; '.join(changes)}): "
                    "a run keeps the split it started with; for a split of the data as it is now, give another "
                    "work_dir (or delete split.parquet, tokenizer.json and features/ there)"
                )
        return uri
    task = ray.remote(num_cpus=0.5, max_retries=0)(make_split)
    try:
        ray.get(task.remote(cfg, uri))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, DataError):  # bad captions: the same error as from the driver
            raise e.cause from None
        raise
    return uri


# --- the split as data for Ray tasks: rows by side, captions by image, the vocabulary ---------


def split_rows(uri: str, storage_cfg: Any, side: str) -> int:
    """Number of captions on one side (`train` or `val`) of a split file: from its footer, or for
    a file written before the footer had them, counted by Ray Data (the filter on `split` is
    pushed down to the Parquet read)."""
    import ray
    from ray.data.expressions import col

    from capray.runtime import footer_readers_for

    fs, path = storage.filesystem(uri, storage_cfg)
    with fs.open_input_file(path) as handle:
        saved = pq.ParquetFile(handle).schema_arrow.metadata or {}
    if SPLIT_ROWS_KEY in saved:
        return int(json.loads(saved[SPLIT_ROWS_KEY])[side])
    with footer_readers_for(1):
        split = ray.data.read_parquet(path, filesystem=fs, columns=["split"])
    return split.filter(expr=col("split") == side).count()


def captions_of(images: Sequence[str], uri: str, storage_cfg: Any, side: str) -> pa.Table:
    """The split's (image, caption) rows of these images on one side, in file order. Only the
    row groups whose image range overlaps the images' are read (Parquet statistics; a split
    file sorted by image, as `save_split` writes, makes that a few row groups per batch)."""
    names = pa.array(sorted(set(images)), pa.string())
    if not len(names):
        return pa.table({"image": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    fs, path = storage.filesystem(uri, storage_cfg)
    where = (
        (pc.field("split") == side)
        & (pc.field("image") >= names[0].as_py())
        & (pc.field("image") <= names[-1].as_py())
        & pc.field("image").isin(names)
    )
    return pq.read_table(path, filesystem=fs, columns=["image", "caption"], filters=where)


def _row_group_ranges(uri: str, storage_cfg: Any, per_range: int) -> list[dict[str, int]]:
    """The split file's row groups in ranges of `per_range`, each with the file row of its
    first row (from the footer)."""
    fs, path = storage.filesystem(uri, storage_cfg)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
    ranges, offset = [], 0
    for start in range(0, meta.num_row_groups, per_range):
        stop = min(start + per_range, meta.num_row_groups)
        ranges.append({"start": start, "stop": stop, "offset": offset})
        offset += sum(meta.row_group(g).num_rows for g in range(start, stop))
    return ranges


def _count_words(batch: dict[str, Any], uri: str, storage_cfg: Any) -> dict[str, Any]:
    """Ray Data task: word counts of the training captions in ranges of the split's row groups,
    each word's first appearance keyed by its caption's row in the file."""
    from capray.text import PAD, count_words

    fs, path = storage.filesystem(uri, storage_cfg)
    words: dict[str, list[int]] = {}
    longest = 0
    with fs.open_input_file(path) as handle:
        f = pq.ParquetFile(handle)
        for start, stop, offset in zip(batch["start"], batch["stop"], batch["offset"]):
            for group in range(int(start), int(stop)):
                t = f.read_row_group(group, columns=["caption", "split"])
                train = np.flatnonzero(pc.equal(t["split"], "train").to_numpy(zero_copy_only=False))
                captions = t["caption"].to_numpy(zero_copy_only=False)[train]
                counts, long = count_words(captions, train + int(offset))
                offset += len(t)
                longest = max(longest, long)
                for w, (n, first) in counts.items():  # rows in increasing order: the first sighting stays
                    if w in words:
                        words[w][0] += n
                    else:
                        words[w] = [n, first]
    # A special token's row (never ranked as a word) carries the batch's longest caption even
    # when its captions have no words.
    words.setdefault(PAD, [0, np.iinfo(np.int64).max])
    return {
        "word": np.array(list(words), dtype=object),
        "count": np.array([v[0] for v in words.values()], dtype=np.int64),
        "first": np.array([v[1] for v in words.values()], dtype=np.int64),
        "longest": np.full(len(words), longest, dtype=np.int64),
    }


def _top_words(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The `n` first rows of a batch of word totals in the tokenizer's order (count, then first
    sighting), each carrying the batch's longest caption."""
    order = np.lexsort((batch["first"], -batch["count"]))[:n]
    out = {k: v[order] for k, v in batch.items()}
    out["longest"] = np.full(len(order), batch["longest"].max(initial=0), dtype=np.int64)
    return out


def count_vocabulary(
    uri: str, storage_cfg: Any, vocab_size: int, max_length: int = 0, groups_per_task: int = VOCAB_GROUPS
) -> Tokenizer:
    """`Tokenizer.fit` over the split's training captions, counted by Ray Data: word counts per
    range of row groups in tasks, summed by word, the top words picked in a task. The driver holds the
    kept words only. Equal to `Tokenizer.fit` on the training captions in file order."""
    import ray
    from ray.data.aggregate import Max, Min, Sum

    from capray.text import SPECIALS, Tokenizer

    # Special tokens in captions are counted like words but never kept: room for all four.
    keep = max(vocab_size - 3, 0) + len(SPECIALS)
    parts = _row_group_ranges(uri, storage_cfg, groups_per_task)
    counts = ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        partial(_count_words, uri=uri, storage_cfg=storage_cfg), batch_size=1
    )
    if len(parts) > 1:  # one task's counts are already the totals
        # A fixed, small number of partitions: the words are few (thousands to a million) next
        # to the captions, and the driver's shuffle bookkeeping stays the same at any size.
        counts = counts.groupby("word", num_partitions=VOCAB_PARTITIONS).aggregate(
            Sum("count", alias_name="count"), Min("first", alias_name="first"), Max("longest", alias_name="longest")
        )
    # Each block's top words, then the top of those in one task: never every word in the driver.
    top = counts.map_batches(partial(_top_words, n=keep), batch_size=None).repartition(1)
    rows = top.map_batches(partial(_top_words, n=keep), batch_size=None).take_all()
    longest = max((int(r["longest"]) for r in rows), default=0)
    words = [r["word"] for r in rows if r["word"] not in SPECIALS]
    return Tokenizer.from_ranked(words, longest, vocab_size, max_length)
