"""The image-job pipeline both extraction and captioning run: shards -> actors -> one file per shard.

    plan (capray.inputs)  ->  Ray Data actor pool, one shard per call  ->  <output>/<shard id>.parquet

Each actor holds the model (InceptionV3, + the decoder for captions) and processes a whole shard:
it streams the shard's rows in model batches, reads and decodes the images of the next batches in
a thread pool while the model runs the current one (Pillow and TensorFlow release the GIL), and
streams the result rows to a Parquet file that appears atomically when the shard is complete.
So a shard's rows never cross the object store (memory per actor: a few batches of pixels), a
file appears as soon as its shard is done (progress is kept as the job goes), and a re-run lists
the output folder's file names and skips the shards that have a file: resume costs O(shards).
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage
from capray.images import IMAGE_SIZE, ImageDecodeError, decode
from capray.inputs import DATA, KEY, URI, Plan, Shard, read_shard, walk

log = logging.getLogger(__name__)
# Error rows kept per shard summary, to show the user a few reasons without collecting them all.
ERROR_EXAMPLES = 3
# Rows are buffered into Parquet row groups of about this size (a model batch each would make
# thousands of tiny row groups per file): 64 MB of features, or 10,000 caption rows.
ROW_GROUP_BYTES = 64 << 20
ROW_GROUP_ROWS = 10_000


class JobError(RuntimeError):
    """The job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


def output_name(shard_id: str) -> str:
    """The output file of a shard."""
    return f"{shard_id}.parquet"


def done_ids(output: str, storage_cfg: Any = None) -> set[str]:
    """Shard ids that already have an output file: a listing of file names, nothing read."""
    if not storage.exists(output, storage_cfg):
        return set()
    names = (os.path.basename(u.rstrip("/")) for u, is_dir in walk(output, storage_cfg, recursive=False) if not is_dir)
    return {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))}


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
            raise TypeError(f"unsupported array of dtype {item.dtype} and shape {item.shape}: expected uint8 (H, W[, 3|4])")
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
                raise KeyError(f"batch has no `{self.image_column}` or `pixels` column (columns: {', '.join(batch)}); "
                               "set image_column= to the column of image bytes or URIs")
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
    return isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)


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


class ShardWriter:
    """Streams tables into one Parquet file that becomes visible only when complete.

    Row groups are encoded and compressed in a background thread while the caller computes the
    next rows (one in flight: at most two row groups of memory), so the model does not stop for
    the codec at every row group.
    """

    def __init__(self, uri: str, storage_cfg: Any, compression: str = "snappy"):
        self.uri, self.storage_cfg, self.compression, self.writer = uri, storage_cfg, compression, None
        self.buffer: list[pa.Table] = []
        self.buffered_bytes = self.buffered_rows = 0
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="parquet")
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
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression=self.compression)
        self.buffer.append(table if table.schema.equals(self.writer.schema) else table.cast(self.writer.schema))
        self.buffered_bytes += table.nbytes
        self.buffered_rows += table.num_rows
        if self.buffered_bytes >= ROW_GROUP_BYTES or self.buffered_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._wait()  # the previous row group's error, if any, surfaces here
        if self.buffer:
            self.in_flight = self.encoder.submit(self.writer.write_table, pa.concat_tables(self.buffer))
            self.buffer = []
            self.buffered_bytes = self.buffered_rows = 0

    def _wait(self) -> None:
        if self.in_flight is not None:
            done, self.in_flight = self.in_flight, None
            done.result()

    def publish(self, empty_schema: pa.Schema) -> None:
        """Close the file and make it appear under its final name (S3: one upload, visible when done)."""
        if self.writer is None:  # an empty shard still gets its file: it is done
            self.writer = pq.ParquetWriter(self.tmp, empty_schema, compression=self.compression)
        self._flush()
        self._wait()
        self.encoder.shutdown()
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
        self.encoder.shutdown()
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class ShardWorker:
    """Ray Data callable class: shard index -> the shard processed and written; returns its summary.

    `model_cls(**model_kwargs)` is built once per actor: a callable taking a batch
    {image, pixels (B, 299, 299, 3) uint8, error ("" = ok)} and returning one pa.Table row per image.
    """

    def __init__(self, shards: list[dict[str, Any]], output: str, cfg: Any, model_cls: Callable[..., Any],
                 model_kwargs: dict[str, Any], batch_size: int, empty_schema: pa.Schema, compression: str = "snappy"):
        self.model = model_cls(**model_kwargs)
        self.compression = compression
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
        out = self.model({"image": np.array(table[KEY].to_pylist(), dtype=object), "pixels": pixels,
                          "error": np.array([e or "" for e in errors], dtype=object)})
        self.model_s += time.perf_counter() - started
        # The input's own columns (ids, URLs, licences, captions...) follow the job's columns;
        # a name the job already uses gets an `input_` prefix.
        for name in table.column_names:
            if name in (KEY, URI, DATA, "_error"):
                continue
            out = out.append_column(f"input_{name}" if name in out.column_names else name, table[name])
        return out

    def process(self, shard: Shard) -> dict[str, Any]:
        """Read, decode, run the model on and write one shard; the summary row."""
        start, retried = time.time(), storage.retried()
        self.wait_s = self.model_s = 0.0
        writer = ShardWriter(storage.join(self.output, output_name(shard.id)), self.storage_cfg, self.compression)
        rows = failed = duplicates = 0
        examples: list[list[str]] = []
        seen: set[str] = set()
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
                keep = [k not in seen and not seen.add(k) for k in keys]
                if not all(keep):
                    duplicates += keep.count(False)
                    table = table.filter(pa.array(keep))
                pending.append((table, self._submit(table)))
                # Decoding runs `ray.inflight_batches` batches ahead of the model.
                while len(pending) > self.ahead:
                    drain()
            while pending:
                drain()
            writer.publish(self.empty_schema)
        except BaseException:
            writer.discard()
            raise
        return {"shard": shard.id, "rows": rows, "failed": failed, "duplicates": duplicates,
                "retried": storage.retried() - retried, "seconds": round(time.time() - start, 2),
                "model_s": round(self.model_s, 3), "wait_s": round(self.wait_s, 3),
                "errors": json.dumps(examples)}


def run(cfg: Any, plan: Plan, output: str, model_cls: Callable[..., Any], model_kwargs: dict[str, Any],
        job_cfg: Any, empty_schema: pa.Schema, label: str, worker_cls: type = ShardWorker,
        error_cls: type[JobError] = JobError, compression: str = "snappy", done: set[str] | None = None) -> dict[str, Any]:
    """Process every shard of `plan` that has no file in `output` yet; returns the job summary.

    `job_cfg` is the job's section (batch_size, min_actors, max_actors, num_gpus); `worker_cls`
    is replaced only by benchmarks (bench/scale.py: a stand-in without decoding); `compression`
    is the output files' Parquet codec; `done` the shard ids already in `output`, when the caller
    has listed it already (a listing of 10^5 files is not free).
    """
    import ray

    start = time.time()
    done = done_ids(output, cfg.storage) if done is None else done
    skipped = [s for s in plan.shards if s.id in done]
    todo = [s for s in plan.shards if s.id not in done]
    if cfg.inputs.limit_shards:
        todo = todo[: cfg.inputs.limit_shards]
    summary: dict[str, Any] = {
        "shards": len(plan.shards), "shards_done_before": len(skipped), "shards_written": 0,
        "images": plan.rows, "already_done": None if any(s.rows < 0 for s in skipped) else sum(s.rows for s in skipped),
        "written": 0, "failed": 0, "duplicates": 0, "errors": [],
        # storage requests tried again after transient errors (throttling, outages)
        "retried": 0,
        # actor seconds in the model, and waiting for images to be read and decoded
        "model_s": 0.0, "wait_s": 0.0,
        # output file -> rows, as the workers reported them (O(shards)): manifests use these
        "files": {},
    }
    if todo:
        print(f"[capray] {label}: {len(todo)} of {len(plan.shards)} shards to do ({len(skipped)} already done) -> {output}", flush=True)
        # One block per shard: each actor call is one whole shard. `range` makes the blocks
        # lazily in read tasks; the shard descriptors travel once, with the actor class.
        ds = ray.data.range(len(todo), override_num_blocks=len(todo))
        ds = ds.map_batches(
            worker_cls,
            fn_constructor_kwargs=dict(shards=[s.to_row() for s in todo], output=output, cfg=cfg, model_cls=model_cls,
                                       model_kwargs=model_kwargs, batch_size=job_cfg.batch_size, empty_schema=empty_schema,
                                       compression=compression),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=job_cfg.min_actors, max_size=job_cfg.max_actors),
            num_gpus=job_cfg.num_gpus,
        )
        last = time.time()
        try:
            for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(part["shard"])):
                    summary["shards_written"] += 1
                    summary["files"][output_name(str(part["shard"][i]))] = int(part["rows"][i])
                    summary["written"] += int(part["rows"][i])
                    summary["failed"] += int(part["failed"][i])
                    summary["duplicates"] += int(part["duplicates"][i])
                    summary["retried"] += int(part["retried"][i])
                    summary["model_s"] += float(part["model_s"][i])
                    summary["wait_s"] += float(part["wait_s"][i])
                    summary["errors"] = (summary["errors"] + json.loads(part["errors"][i]))[:ERROR_EXAMPLES * 4]
                if time.time() - last >= 10:
                    last = time.time()
                    rate = summary["written"] / max(last - start, 1e-9)
                    print(f"[capray] {label}: {summary['shards_written']}/{len(todo)} shards, {summary['written']} rows "
                          f"({summary['failed']} failed), {rate:.1f} rows/s", flush=True)
        except Exception as e:  # Ray wraps the worker's error (e.g. OSError from S3) in its own types
            raise error_cls(
                f"{label} job stopped before every shard was written to {output} ({summary['shards_written']} of "
                f"{len(todo)} written; {root_cause(e)}); the files already there are complete and kept: "
                "re-run the same command to do the rest"
            ) from e
    seconds = time.time() - start
    busy = summary["model_s"] + summary["wait_s"]
    summary["wait_share"] = round(summary["wait_s"] / busy, 3) if busy else 0.0
    summary.update(
        remaining_shards=len(plan.shards) - len(skipped) - summary["shards_written"],
        seconds=round(seconds, 1),
        images_per_s=round(summary["written"] / max(seconds, 1e-9), 1),
        output=output,
    )
    return summary


def report_lines(label: str, s: dict[str, Any]) -> list[str]:
    """The summary's notes on retries and on how busy the model was, for the job's log."""
    lines = []
    if s.get("retried"):
        lines.append(f"[capray] {label}: {s['retried']} storage requests were tried again after transient errors "
                     "(throttling, dropped connections; storage.retries)")
    if s.get("model_s"):
        lines.append(f"[capray] {label}: the model waited for images {s['wait_share']:.0%} of its time "
                     f"({s['wait_s']:.1f} s waiting, {s['model_s']:.1f} s computing, summed over actors)"
                     + ("; decoding does not keep up: raise inputs.io_threads, or give the actors' nodes more CPUs"
                        if s["wait_share"] > 0.1 else ""))
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
