"""The image-job pipeline both extraction and captioning run: shards -> actors -> one file per shard.

    plan (capray.inputs)  ->  Ray Data actor pool, one shard per call  ->  <output>/<shard id>.parquet

Each actor holds the model (InceptionV3, + the decoder for captions) and processes a whole shard:
it streams the shard's rows in model batches, reads and decodes the images of the next batches in
a thread pool while the model runs the current one (Pillow and TensorFlow release the GIL), and
streams the result rows to a Parquet file that appears atomically when the shard is complete.
So a shard's rows never cross the object store (memory per actor: a few batches of pixels), a
file appears as soon as its shard is done (progress is kept as the job goes), and a re-run lists
the output folder's file names and skips the shards that have a file: resume costs O(shards).
A shard whose input changed (capray.shards) copies the rows of its unchanged images from the
files it replaces and runs only new and changed images through the model.
The driver holds the shard list and one small summary row per shard, never a row per image.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import shards, storage
from capray.images import IMAGE_SIZE, ImageDecodeError, decode
from capray.inputs import DATA, KEY, URI, VERSION, InputError, Plan, Shard, read_shard
from capray.shards import output_name

log = logging.getLogger(__name__)
# Error rows kept per shard summary, to show the user a few reasons without collecting them all.
ERROR_EXAMPLES = 3
# Rows are buffered into Parquet row groups of about this size (a model batch each would make
# thousands of tiny row groups per file): 64 MB of features, or 10,000 caption rows.
ROW_GROUP_BYTES = 64 << 20
ROW_GROUP_ROWS = 10_000


class JobError(RuntimeError):
    """The job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


def to_pixels(item: Any, storage_cfg: Any, max_pixels: int) -> np.ndarray:
    """One image as a path/URI, encoded bytes, a PIL image or a uint8 array -> (299, 299, 3) uint8,
    as the jobs decode it; ImageDecodeError for a bad image, TypeError for an unsupported type."""
    from PIL import Image

    from capray.images import from_pil

    if isinstance(item, (str, os.PathLike)):
        return decode(storage.read_bytes(os.fspath(item), storage_cfg), max_pixels)
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
    max_pixels = 64_000_000

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


def load_image(item: Any, storage_cfg: Any, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """One image (a URI to read, or bytes) -> (299, 299, 3) uint8 pixels, or None and the reason."""
    try:
        data = storage.read_bytes(item, storage_cfg) if isinstance(item, str) else item
        return decode(data, max_pixels), ""
    except ImageDecodeError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot read file: {e}"


def with_input_columns(out: pa.Table, table: pa.Table) -> pa.Table:
    """The job's rows `out` followed by the input's own columns of `table` (ids, URLs, captions,
    `image_version`...); a name the job already uses gets an `input_` prefix."""
    for name in table.column_names:
        if name not in (KEY, URI, DATA, "_error"):  # the reader's own columns
            out = out.append_column(f"input_{name}" if name in out.column_names else name, table[name])
    return out


class ShardWriter:
    """Streams tables into one Parquet file that becomes visible only when complete.

    Row groups are encoded and compressed in a background thread while the caller computes the
    next rows (one in flight: at most two row groups of memory), so the model does not stop for
    the codec at every row group.
    """

    def __init__(self, uri: str, storage_cfg: Any, compression: str = "snappy", metadata: dict[str, str] | None = None):
        self.uri, self.storage_cfg, self.compression = uri, storage_cfg, compression
        self.writer: pq.ParquetWriter | None = None
        self.metadata = metadata or {}
        self.buffer: list[pa.Table] = []
        self.buffered_bytes = self.buffered_rows = 0
        self.codec = ThreadPoolExecutor(1, thread_name_prefix="parquet")  # encodes and compresses row groups
        self.in_flight: Any = None
        if storage.is_remote(uri):
            fd, self.tmp = tempfile.mkstemp(suffix=".parquet")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(uri), f".{os.path.basename(uri)}.{uuid.uuid4().hex}.tmp")

    def write(self, table: pa.Table) -> None:
        """Append rows (the first table fixes the file's schema)."""
        if self.writer is None:
            self.writer = pq.ParquetWriter(
                self.tmp, table.schema.with_metadata(self.metadata), compression=self.compression
            )
        if not table.schema.equals(self.writer.schema):
            table = table.select(self.writer.schema.names).cast(self.writer.schema)
        self.buffer.append(table)
        self.buffered_bytes += table.nbytes
        self.buffered_rows += table.num_rows
        if self.buffered_bytes >= ROW_GROUP_BYTES or self.buffered_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._wait()  # the previous row group's error, if any, surfaces here
        if self.buffer:
            assert self.writer is not None  # made by the first write (or publish) before any flush
            self.in_flight = self.codec.submit(self.writer.write_table, pa.concat_tables(self.buffer))
            self.buffer = []
            self.buffered_bytes = self.buffered_rows = 0

    def _wait(self) -> None:
        if self.in_flight is not None:
            done, self.in_flight = self.in_flight, None
            done.result()

    def publish(self, empty_schema: pa.Schema) -> None:
        """Close the file and make it appear under its final name (S3: one upload, visible when done)."""
        if self.writer is None:  # an empty shard still gets its file: it is done
            self.writer = pq.ParquetWriter(
                self.tmp, empty_schema.with_metadata(self.metadata), compression=self.compression
            )
        self._flush()
        self._wait()
        self.codec.shutdown()
        self.writer.close()
        try:
            if storage.is_remote(self.uri):
                storage.upload_file(self.tmp, self.uri, self.storage_cfg)
            else:
                os.replace(self.tmp, self.uri)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def discard(self) -> None:
        """Drop the partial file after an error."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 (the error that matters is the one being handled)
            pass
        self.codec.shutdown()
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class ShardWorker:
    """Ray Data callable class: shard index -> the shard processed and written; returns its summary.

    `model_cls(**model_kwargs)` is built once per actor: a callable taking a batch
    {image, pixels (B, 299, 299, 3) uint8, error ("" = ok)} and returning one pa.Table row per image.
    """

    def __init__(
        self,
        shards: list[dict[str, Any]],
        output: str,
        cfg: Any,
        model_cls: Callable[..., Any],
        model_kwargs: dict[str, Any],
        batch_size: int,
        empty_schema: pa.Schema,
        compression: str = "snappy",
        settings: dict[str, Any] | None = None,
    ):
        self.model = model_cls(**model_kwargs)
        self.compression, self.settings = compression, settings or {}
        self.shards, self.output, self.cfg = shards, output, cfg
        self.batch_size, self.empty_schema = batch_size, empty_schema
        # Plain values: an OmegaConf lookup per batch costs more than the stand-in model (bench/scale.py).
        self.storage_cfg, self.max_pixels, self.ahead = cfg.storage, cfg.data.max_pixels, cfg.ray.inflight_batches
        self.pool = ThreadPoolExecutor(cfg.inputs.io_threads)
        self.wait_s = self.model_s = 0.0

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
                errors[i] = errors[i] or "empty image path/URI"
                continue
            px, err = fut.result()
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

    def _copy(self, shard: Shard, picks: list[tuple[int, int]], writer: ShardWriter) -> tuple[int, int]:
        """Copy rows (file, row) of the replaced files into `writer`, a row group at a time;
        (rows copied, of which failed)."""
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
                        failed += rows_.num_rows - rows_["error"].null_count if "error" in rows_.column_names else 0
                        writer.write(rows_)
                    first += n
        return len(picks), failed

    def process(self, shard: Shard) -> dict[str, Any]:
        """Read, decode, run the model on and write one shard; the summary row. Images whose key
        and version an older file of the same keys already has are copied, not computed again."""
        start, retried = time.time(), storage.retried()
        self.wait_s = self.model_s = 0.0
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
            copied, copied_failed = self._copy(shard, picks, writer) if picks else (0, 0)
            failed += copied_failed
            writer.publish(self.empty_schema)
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
        }


def run(
    cfg: Any,
    plan: Plan,
    output: str,
    model_cls: Callable[..., Any],
    model_kwargs: dict[str, Any],
    job_cfg: Any,
    empty_schema: pa.Schema,
    label: str,
    worker_cls: type = ShardWorker,
    error_cls: type[JobError] = JobError,
    compression: str = "snappy",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Process every shard of `plan` that `output` does not hold yet (capray.shards); returns the
    job summary.

    `job_cfg` is the job's section (batch_size, min_actors, max_actors, num_gpus); `worker_cls`
    is replaced only by benchmarks (bench/scale.py: a stand-in without decoding); `compression`
    is the output files' Parquet codec; `settings` what the output depends on besides the input
    (checkpoint, decoding, precision...): recorded in the index and in every file, and a re-run
    with others into the same output is refused.
    """
    import ray

    start = time.time()
    settings = settings or {}
    for line in listing_lines(label, plan):
        log.info(line)
    try:
        work = shards.reconcile(cfg, plan, output, settings)
    except OSError as e:
        raise InputError(f"cannot read the output folder {output}: {e}") from None
    todo = work.todo[: cfg.inputs.limit_shards] if cfg.inputs.limit_shards else work.todo
    summary: dict[str, Any] = {
        "shards": len(plan.shards),
        "shards_done_before": len(work.done),
        "shards_written": 0,
        "images": plan.rows,
        "already_done": None if any(s.rows < 0 for s in work.done) else sum(s.rows for s in work.done),
        "written": 0,
        "failed": 0,
        "duplicates": 0,
        "copied": 0,
        "errors": [],
        # storage requests tried again after transient errors (throttling, outages)
        "retried": 0,
        # actor seconds in the model, and waiting for images to be read and decoded
        "model_s": 0.0,
        "wait_s": 0.0,
        # output file -> rows, as the workers reported them (O(shards)): manifests use these
        "files": {},
    }
    for line in work_lines(label, work, output):
        log.info(line)
    written: dict[str, tuple[int, int]] = {}
    if todo:
        log.info(f"{label}: {len(todo)} of {len(plan.shards)} shards to do ({len(work.done)} already done) -> {output}")
        # One block per shard: each actor call is one whole shard. `range` makes the blocks
        # lazily in read tasks; the shard descriptors travel once, with the actor class.
        ds = ray.data.range(len(todo), override_num_blocks=len(todo))
        ds = ds.map_batches(
            worker_cls,
            fn_constructor_kwargs=dict(
                shards=[s.to_row() for s in todo],
                output=output,
                cfg=cfg,
                model_cls=model_cls,
                model_kwargs=model_kwargs,
                batch_size=job_cfg.batch_size,
                empty_schema=empty_schema,
                compression=compression,
                settings=settings,
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=job_cfg.min_actors, max_size=job_cfg.max_actors),
            num_gpus=job_cfg.num_gpus,
        )
        last = time.time()
        try:
            for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(part["shard"])):
                    shard_id = str(part["shard"][i])
                    written[shard_id] = (int(part["rows"][i]), int(part["failed"][i]))
                    summary["shards_written"] += 1
                    summary["files"][output_name(shard_id)] = int(part["rows"][i])
                    summary["written"] += int(part["rows"][i])
                    summary["failed"] += int(part["failed"][i])
                    summary["duplicates"] += int(part["duplicates"][i])
                    summary["copied"] += int(part["copied"][i])
                    summary["retried"] += int(part["retried"][i])
                    summary["model_s"] += float(part["model_s"][i])
                    summary["wait_s"] += float(part["wait_s"][i])
                    summary["errors"] = (summary["errors"] + json.loads(part["errors"][i]))[: ERROR_EXAMPLES * 4]
                if time.time() - last >= 10:
                    last = time.time()
                    rate = summary["written"] / max(last - start, 1e-9)
                    log.info(
                        f"{label}: {summary['shards_written']}/{len(todo)} shards, {summary['written']} rows "
                        f"({summary['failed']} failed), {rate:.1f} rows/s"
                    )
        except Exception as e:  # Ray wraps the worker's error (e.g. OSError from S3) in its own types
            try:
                _record(cfg, plan, output, work, written)
            except OSError as storage_down:  # the index written at the start already names every shard
                log.warning("%s: could not update %s after the stop: %s", label, shards.INDEX, storage_down)
            raise error_cls(
                f"{label} job stopped before every shard was written to {output} ({summary['shards_written']} of "
                f"{len(todo)} written; {root_cause(e)}); the files already there are complete and kept: "
                "re-run the same command to do the rest"
            ) from e
    summary["cleanup"] = _record(cfg, plan, output, work, written)
    seconds = time.time() - start
    busy = summary["model_s"] + summary["wait_s"]
    summary["wait_share"] = round(summary["wait_s"] / busy, 3) if busy else 0.0
    computed = summary["written"] - summary["copied"]
    summary.update(
        remaining_shards=sum(1 for s in work.todo if s.id not in written and s.id not in work.retry_ids),
        seconds=round(seconds, 1),
        # Images through the model: rows copied from the files a shard replaces cost no model time.
        images_per_s=round(computed / max(seconds, 1e-9), 1),
        output=output,
        computed=computed,
    )
    return summary


def _record(
    cfg: Any, plan: Plan, output: str, work: shards.Work, written: dict[str, tuple[int, int]]
) -> dict[str, int]:
    """Replace what the written shards supersede and record them in the index (also after a stop)."""
    done = shards.finish(cfg, plan, output, work, written)
    if any(done.values()):
        log.info(
            "%s: %d replaced files deleted, %d of removed input files, %d from before content-bound shards",
            output,
            done["replaced"],
            done["pruned"],
            done["legacy_removed"],
        )
    return done


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"


def listing_lines(label: str, plan: Plan) -> list[str]:
    """The job's first lines for a listed folder/prefix: which listing, how old, what changed."""
    info = plan.listing
    if not info:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["taken_at"]))
    age = _age(time.time() - info["taken_at"])
    if info["reused"]:
        head = f"using the saved listing of {plan.input} taken {when} ({age} old; inputs.relist=true lists again)"
    else:
        head = f"listed {plan.input} now ({when}; inputs.relist=false would reuse the saved listing)"
    lines = [f"{label}: {head}: {plan.rows} images in {len(plan.shards)} shards"]
    c = info.get("changes")
    if info.get("before_taken_at") is None:
        lines.append(f"{label}: no earlier listing of this input to compare with")
    elif c is None:
        lines.append(f"{label}: the earlier listing could not be compared with (see the warning above)")
    else:
        before = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["before_taken_at"]))
        lines.append(
            f"{label}: since the listing of {before}: {c['new']} new, {c['changed']} changed, "
            f"{c['removed']} removed, {c['unchanged']} unchanged images"
        )
    return lines


def work_lines(label: str, work: shards.Work, output: str) -> list[str]:
    """What the output folder holds against the plan: done, to do, replaced, kept, legacy."""
    lines = []
    replaced = [i for i, by in work.superseded.items() if by]
    pruned = [i for i, by in work.superseded.items() if not by]
    if replaced or pruned or work.kept or work.retried:
        lines.append(
            f"{label}: {output}: {len(work.done)} shards done, {len(work.todo)} to do "
            f"({work.copy_sources} copy the rows of unchanged images from the {len(replaced)} files they replace"
            + (f"; {work.retried} redone for their failed rows (inputs.retry_failed)" if work.retried else "")
            + ")"
            + (
                f"; {len(pruned)} files of input files that are gone are deleted at the end (inputs.removed=prune)"
                if pruned
                else ""
            )
            + (
                f"; {len(work.kept)} files of input files that are gone are kept (inputs.removed=keep)"
                if work.kept
                else ""
            )
        )
    if work.legacy:
        lines.append(
            f"{label}: {output}: {len(work.legacy)} files were written by a capray without content-bound "
            "shards: their images are done again, and the old files are deleted once every shard is written"
        )
    return lines


def report_lines(label: str, s: dict[str, Any]) -> list[str]:
    """The summary's notes on retries and on how busy the model was, for the job's log."""
    lines = []
    if s.get("retried"):
        lines.append(
            f"{label}: {s['retried']} storage requests were tried again after transient errors "
            "(throttling, dropped connections; storage.retries)"
        )
    if s.get("model_s"):
        lines.append(
            f"{label}: the model waited for images {s['wait_share']:.0%} of its time "
            f"({s['wait_s']:.1f} s waiting, {s['model_s']:.1f} s computing, summed over actors)"
            + (
                "; decoding does not keep up: raise inputs.io_threads, or give the actors' nodes more CPUs"
                if s["wait_share"] > 0.1
                else ""
            )
        )
    return lines


def root_cause(e: BaseException) -> str:
    """The innermost error under Ray's wrappers, as `Type: first line`.

    Ray Data re-raises a worker's error as RayTaskError(UserCodeException) whose chain, once in
    the driver, may end at "UDF failed to process a data block"; the worker's own error is then
    only in the remote traceback text, where it is the first `SomeError: message` line.
    """
    seen = set()
    outer = e
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    if type(e).__name__ in ("UserCodeException", "RayTaskError") or "UDF failed" in str(e):
        import re

        for line in str(outer).splitlines():
            m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$", line.strip())
            if m and not m.group(1).endswith(("RayTaskError", "UserCodeException")):
                return f"{m.group(1)}: {m.group(2)}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
