"""The shard worker: one Ray Data actor call processes a whole shard into its output file.

It streams the shard's rows (capray.reader) in model batches, reads and decodes the images of the
next batches in a thread pool while the model runs the current one (Pillow and TensorFlow release
the GIL), copies the rows of unchanged images from the files a changed shard replaces
(capray.shards), and streams the result rows to the shard's file (capray.writer). It returns one
small summary row: the driver never sees a row per image.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import progress, storage
from capray.images import EMPTY_PATH, IMAGE_SIZE, ImageDecodeError, clean_message, decode, error_class
from capray.inputs import DATA, KEY, URI, VERSION, Shard
from capray.reader import read_shard
from capray.shards import output_name
from capray.writer import ShardWriter

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)


# Error rows kept per shard summary, to show the user a few reasons without collecting them all.
ERROR_EXAMPLES = 3


def load_image(item: Any, storage_cfg: Any, max_pixels: int) -> tuple[np.ndarray | None, str, int, float, float]:
    """One image (a URI to read, or bytes) -> (299, 299, 3) uint8 pixels, or None and the reason;
    then the bytes it had, and the seconds spent reading and decoding it (the shard's stats)."""
    t0 = time.perf_counter()
    data = b""
    if isinstance(item, str) and not item.strip():
        return None, EMPTY_PATH, 0, 0.0, 0.0
    try:
        data = storage.read_bytes(item, storage_cfg) if isinstance(item, str) else item
        t1 = time.perf_counter()
        try:
            return decode(data, max_pixels), "", len(data), t1 - t0, time.perf_counter() - t1
        except ImageDecodeError as e:
            return None, str(e), len(data), t1 - t0, time.perf_counter() - t1
    except FileNotFoundError as e:
        return None, clean_message(f"cannot read file: not found: {e}"), 0, time.perf_counter() - t0, 0.0
    except OSError as e:
        return None, clean_message(f"cannot read file: {e}"), 0, time.perf_counter() - t0, 0.0


def with_input_columns(out: pa.Table, table: pa.Table) -> pa.Table:
    """The job's rows `out` followed by the input's own columns of `table` (ids, URLs, captions,
    `image_version`...); a name the job already uses gets an `input_` prefix."""
    for name in table.column_names:
        if name not in (KEY, URI, DATA, "_error"):  # the reader's own columns
            out = out.append_column(f"input_{name}" if name in out.column_names else name, table[name])
    return out


class ShardWorker:
    """Ray Data callable class: shard index -> the shard processed and written; returns its summary.

    `model_cls(**model_kwargs)` is built once per actor: a callable taking a batch
    {image, pixels (B, 299, 299, 3) uint8, error ("" = ok)} and returning one pa.Table row per image.
    """

    def __init__(
        self,
        shards: list[dict[str, Any]],
        output: str,
        cfg: Config,
        model_cls: Callable[..., Any],
        model_kwargs: dict[str, Any],
        batch_size: int,
        empty_schema: pa.Schema,
        compression: str = "snappy",
        settings: dict[str, Any] | None = None,
        run: str = "",
    ):
        self.model = model_cls(**model_kwargs)
        self.run = run  # the driver's run id (capray.progress), in every shard's stats
        self.compression, self.settings = compression, settings or {}
        self.shards, self.output, self.cfg = shards, output, cfg
        self.batch_size, self.empty_schema = batch_size, empty_schema
        # Plain values: an OmegaConf lookup per batch costs more than the stand-in model (bench/scale.py).
        self.storage_cfg, self.max_pixels, self.ahead = cfg.storage, cfg.data.max_pixels, cfg.ray.inflight_batches
        self.pool = ThreadPoolExecutor(cfg.inputs.io_threads)
        self.wait_s = self.model_s = self.read_s = self.decode_s = 0.0
        self.bytes_read = 0
        import capray

        # Every shard's stats name what made it (docs/outputs.md#per-shard-stats).
        self.origin = {
            "node": progress.node(),
            "capray_version": capray.__version__,
            "checkpoint": str(self.settings.get("checkpoint") or self.settings.get("backbone.weights") or ""),
            "config_digest": progress.settings_digest(self.settings),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.process(Shard.from_row(self.shards[int(i)])) for i in batch["id"]]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def _submit(self, table: pa.Table) -> list[Any]:
        items = (table[URI] if URI in table.column_names else table[DATA]).to_pylist()
        errors = table["_error"].to_pylist() if "_error" in table.column_names else [None] * len(items)
        return [
            None if err or item is None else self.pool.submit(load_image, item, self.storage_cfg, self.max_pixels)
            for item, err in zip(items, errors)
        ]

    def _run_model(self, table: pa.Table, futures: list[Any]) -> pa.Table:
        n = table.num_rows
        pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        errors = table["_error"].to_pylist() if "_error" in table.column_names else [None] * n
        waited = time.perf_counter()
        for i, fut in enumerate(futures):
            if fut is None:
                errors[i] = errors[i] or EMPTY_PATH
                continue
            px, err, nbytes, read_s, decode_s = fut.result()
            self.bytes_read += nbytes
            self.read_s += read_s
            self.decode_s += decode_s
            if px is None:
                errors[i] = err
            else:
                pixels[i] = px
        # Time the model spends waiting for its images (reads and decodes not done yet): the
        # job's measure of whether decoding keeps up (raise inputs.io_threads, or CPUs per GPU).
        started = time.perf_counter()
        self.wait_s += started - waited
        out = self.model(
            {
                "image": np.array(table[KEY].to_pylist(), dtype=object),
                "pixels": pixels,
                "error": np.array([e or "" for e in errors], dtype=object),
            }
        )
        self.model_s += time.perf_counter() - started
        return with_input_columns(out, table)

    def _old_rows(
        self, shard: Shard
    ) -> tuple[dict[tuple[str, str | None], tuple[int, int]], dict[str, tuple[int, int]]]:
        """The rows this shard may copy from the files it replaces, as (file, row) positions:
        by (key, version) for the keys in its range (an ok row preferred; failed rows not at all
        with inputs.retry_failed), and one row per key for keeping removed images. Reads only
        the light columns; the rows themselves are copied at the end, a row group at a time."""
        by_version: dict[tuple[str, str | None], tuple[int, int]] = {}
        by_key: dict[str, tuple[int, int]] = {}
        retry = self.cfg.inputs.retry_failed
        for f, name in enumerate(shard.sources):
            fs, path = storage.filesystem(storage.join(self.output, name), self.storage_cfg)
            with fs.open_input_file(path) as handle:
                pf = pq.ParquetFile(handle)
                cols = [c for c in (KEY, VERSION, "error") if c in pf.schema_arrow.names]
                t = pf.read(columns=cols)
            keys = t[KEY].to_pylist()
            versions = t[VERSION].to_pylist() if VERSION in cols else [None] * len(keys)
            errors = t["error"].to_pylist() if "error" in cols else [None] * len(keys)
            for r, (k, v, err) in enumerate(zip(keys, versions, errors)):
                if k is None or k < shard.lo or (shard.hi and k >= shard.hi):
                    continue
                by_key.setdefault(k, (f, r))
                if err is not None and (retry or (k, v) in by_version):
                    continue
                by_version[(k, v)] = (f, r)
        return by_version, by_key

    def _copy(
        self, shard: Shard, picks: list[tuple[int, int]], writer: ShardWriter, classes: dict[str, int]
    ) -> tuple[int, int]:
        """Copy rows (file, row) of the replaced files into `writer`, a row group at a time;
        (rows copied, of which failed), the failed ones counted by class into `classes`."""
        rows: dict[int, set[int]] = {}
        failed = 0
        for f, r in picks:
            rows.setdefault(f, set()).add(r)
        for f, wanted in sorted(rows.items()):
            fs, path = storage.filesystem(storage.join(self.output, shard.sources[f]), self.storage_cfg)
            with fs.open_input_file(path) as handle:
                pf = pq.ParquetFile(handle)
                first = 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    take = [r - first for r in range(first, first + n) if r in wanted]
                    if take:
                        rows_ = pf.read_row_group(g).take(take)
                        if "error" in rows_.column_names:
                            failed += rows_.num_rows - rows_["error"].null_count
                            _count(rows_["error"], classes)
                        writer.write(rows_)
                    first += n
        return len(picks), failed

    def process(self, shard: Shard) -> dict[str, Any]:
        """Read, decode, run the model on and write one shard; the summary row. Images whose key
        and version an older file of the same keys already has are copied, not computed again."""
        start, retried = time.time(), storage.retried()
        self.wait_s = self.model_s = self.read_s = self.decode_s = 0.0
        self.bytes_read = 0
        classes: dict[str, int] = {}
        # Read before the new file is written: with inputs.retry_failed it replaces its own source.
        old, old_keys = self._old_rows(shard) if shard.sources else ({}, {})
        meta = {"capray": json.dumps({"shard": shard.id, "settings": self.settings})}
        writer = ShardWriter(storage.join(self.output, output_name(shard.id)), self.storage_cfg, self.compression, meta)
        rows = failed = duplicates = 0
        examples: list[list[str]] = []
        seen: set[str] = set()
        picks: list[tuple[int, int]] = []
        pending: deque = deque()

        def drain() -> None:
            nonlocal rows, failed
            table, futures = pending.popleft()
            out = self._run_model(table, futures)
            writer.write(out)
            errs = out["error"]
            rows += out.num_rows
            failed += out.num_rows - errs.null_count
            if errs.null_count < len(errs):
                _count(errs, classes)
            if len(examples) < ERROR_EXAMPLES and errs.null_count < len(errs):
                for key, err in zip(out["image"].to_pylist(), errs.to_pylist()):
                    if err is not None and len(examples) < ERROR_EXAMPLES:
                        examples.append([key, err])

        try:
            for table in read_shard(shard, self.cfg, self.batch_size):
                # The same image twice in one shard (a manifest listing it twice) is done once.
                keys = table[KEY].to_pylist()
                keep = []
                for k in keys:
                    keep.append(k not in seen)
                    seen.add(k)
                if not all(keep):
                    duplicates += keep.count(False)
                    table = table.filter(pa.array(keep))
                    keys = table[KEY].to_pylist()
                if old:
                    versions = table[VERSION].to_pylist() if VERSION in table.column_names else [None] * len(keys)
                    hits = [old.get((k, v)) for k, v in zip(keys, versions)]
                    if any(hits):
                        picks += [h for h in hits if h]
                        table = table.filter(pa.array([h is None for h in hits]))
                if table.num_rows:
                    pending.append((table, self._submit(table)))
                # Decoding runs `ray.inflight_batches` batches ahead of the model.
                while len(pending) > self.ahead:
                    drain()
            while pending:
                drain()
            if self.cfg.inputs.removed == "keep":  # rows of images no longer in the input stay
                picks += [pos for k, pos in old_keys.items() if k not in seen]
            copied, copied_failed = self._copy(shard, picks, writer, classes) if picks else (0, 0)
            failed += copied_failed
            stats = {
                "shard": shard.id,
                "run": self.run,
                "rows": rows + copied,
                "ok": rows + copied - failed,
                "failed": failed,
                "errors": classes,
                "duplicates": duplicates,
                "copied": copied,
                "bytes_read": self.bytes_read,
                "read_s": round(self.read_s, 3),
                "decode_s": round(self.decode_s, 3),
                "wait_s": round(self.wait_s, 3),
                "model_s": round(self.model_s, 3),
                "write_s": round(writer.write_s, 3),
                "upload_s": 0.0,
                "started": round(start, 3),
                "ended": 0.0,
                **self.origin,
            }
            # In the footer, so the stats appear exactly when the file does; `ended` and the
            # writing time up to the footer are the last things known before it is closed.
            writer.publish(self.empty_schema, lambda: {progress.STATS_KEY: json.dumps(_finish(stats, writer))})
            stats["upload_s"] = round(writer.upload_s, 3)
        except BaseException:
            writer.discard()
            raise
        return {
            "shard": shard.id,
            "rows": rows + copied,
            "failed": failed,
            "duplicates": duplicates,
            "copied": copied,
            "retried": storage.retried() - retried,
            "seconds": round(time.time() - start, 2),
            "model_s": round(self.model_s, 3),
            "wait_s": round(self.wait_s, 3),
            "errors": json.dumps(examples),
            "stats": json.dumps(stats),
        }


def _count(errors: pa.ChunkedArray | pa.Array, classes: dict[str, int]) -> None:
    for err in errors.to_pylist():
        if err is not None:
            c = error_class(err)
            classes[c] = classes.get(c, 0) + 1


def _finish(stats: dict[str, Any], writer: ShardWriter) -> dict[str, Any]:
    stats["ended"] = round(time.time(), 3)
    stats["write_s"] = round(writer.write_s, 3)
    return stats
