"""Bulk captioning job: a folder / bucket prefix / manifest of images -> caption rows in Parquet.

Pipeline (Ray Data): list URIs -> read + decode (stateless CPU tasks) -> one actor pool that holds
both InceptionV3 and the decoder (features never leave the actor) -> atomic Parquet files.
Every input image yields exactly one row; unreadable images get `error` set and no caption.
Re-running with the same output captions only the images that have no row yet.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from capray import storage
from capray.images import load_batch
from capray.parquet import AtomicParquetSink, read_columns
from capray.runtime import bound_memory, uri_dataset

log = logging.getLogger(__name__)
# The documented output schema (README "Output schema"); explicit so all-null columns keep types.
SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("caption", pa.string()),
        ("log_prob", pa.float32()),
        ("num_tokens", pa.int32()),
        ("strategy", pa.string()),
        ("model", pa.string()),
        ("error", pa.string()),
    ]
)
# Optional column (infer.attention=true): per emitted word, its 64 attention weights.
ATTENTION_FIELD = pa.field("attention", pa.list_(pa.list_(pa.float32())))


class InputError(RuntimeError):
    """The job cannot start: inputs missing, unreadable or unreachable."""


class CaptionJobError(RuntimeError):
    """The job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


def _root_cause(e: BaseException) -> str:
    """The innermost error under Ray's wrappers, as `Type: first line`."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class CaptionPredictor:
    """Ray Data callable class: pixels -> captions (greedy or beam), the model loaded once per actor."""

    def __init__(self, checkpoint_uri: str, storage_cfg: Any, infer_cfg: Any, model_cfg: Any = None):
        """`model_cfg`: the running job's `model` section (mixed_precision, jit_compile); None = neither."""
        import tensorflow as tf

        from capray import checkpoint
        from capray.model import FEATURE_DIM, NUM_CELLS, ImageEncoder, set_precision

        mixed = bool(model_cfg and model_cfg.mixed_precision)
        jit = bool(model_cfg and model_cfg.jit_compile)
        set_precision(mixed)  # before the model and backbone are built
        self.model, self.tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, storage_cfg)
        # The backbone must be the one the training features came from. XLA compiles it; the
        # decoding loops stop early with data-dependent shapes, which XLA cannot compile.
        self.encoder = ImageEncoder(train_cfg.encoder.weights, train_cfg.encoder.seed, storage_cfg, jit_compile=jit)
        self.model_id, self.attention = checkpoint_uri, infer_cfg.attention
        steps = (infer_cfg.max_length or self.tokenizer.max_length) - 1
        if infer_cfg.strategy == "beam":
            k, alpha = infer_cfg.beam_size, infer_cfg.length_alpha
            self.strategy = f"beam{k}"
            decode = lambda f: self.model.beam_search(f, steps, k, alpha)  # noqa: E731
        else:
            self.strategy = "greedy"
            decode = lambda f: self.model.greedy(f, steps)  # noqa: E731
        # One trace for every batch size, as for the backbone (capray.model.ImageEncoder).
        spec = tf.TensorSpec([None, NUM_CELLS, FEATURE_DIM], tf.float32)
        self._decode = tf.function(decode, input_signature=[spec])

    def caption_pixels(self, pixels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(B, 299, 299, 3) uint8 -> captions, log-probs (B,), token counts (B,), attention (B, steps, 64)."""
        tokens, attention, log_prob, lengths = (t.numpy() for t in self._decode(self.encoder(pixels)))
        return [self.tokenizer.decode(row) for row in tokens], log_prob, lengths, attention

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        n = len(batch["image"])
        ok = np.array([not e for e in batch["error"]])
        captions: list[str | None] = [None] * n
        log_probs: list[float | None] = [None] * n
        num_tokens: list[int | None] = [None] * n
        attention: list[list | None] = [None] * n
        if ok.any():
            caps, lp, lengths, att = self.caption_pixels(batch["pixels"][ok])
            for j, i in enumerate(np.flatnonzero(ok)):
                captions[i], log_probs[i], num_tokens[i] = caps[j], float(lp[j]), int(lengths[j])
                attention[i] = att[j, : lengths[j]].tolist()
        columns = {
            "image": list(batch["image"]),
            "caption": captions,
            "log_prob": log_probs,
            "num_tokens": num_tokens,
            "strategy": [self.strategy] * n,
            "model": [self.model_id] * n,
            "error": [e or None for e in batch["error"]],
        }
        schema = SCHEMA
        if self.attention:
            columns["attention"] = attention
            schema = SCHEMA.append(ATTENTION_FIELD)
        return pa.table(columns, schema=schema)


def caption_image(predictor: CaptionPredictor, data: bytes, max_pixels: int) -> str:
    """The library's single-image caption: image bytes -> caption (the predictor's strategy)."""
    from capray.images import decode

    return predictor.caption_pixels(decode(data, max_pixels)[None])[0][0]


def list_inputs(cfg: Any, uri: str) -> list[str]:
    """Image URIs to caption: a manifest (.csv/.parquet with `image`), or the files under a
    folder/prefix with one of `infer.extensions`, filtered by `infer.glob`; sorted, unique."""
    try:
        if uri.lower().endswith((".csv", ".parquet")):
            from capray.data import read_manifest

            images = list(dict.fromkeys(read_manifest(uri, storage_cfg=cfg.storage)["image"]))
        else:
            if not storage.exists(uri, cfg.storage):
                raise InputError(f"input not found: {uri}")
            suffixes = tuple(f".{e.lower().lstrip('.')}" for e in cfg.infer.extensions)
            images = storage.list_files(uri, cfg.storage, suffixes)
    except OSError as e:  # unreachable endpoint, bad credentials, no permission...
        raise InputError(f"cannot list {uri}: {e}") from None
    if cfg.infer.glob:
        images = [u for u in images if fnmatch.fnmatch(u.rsplit("/", 1)[-1], cfg.infer.glob)]
    return sorted(images)


def caption(cfg: Any, checkpoint_uri: str, inputs: str, output: str) -> dict[str, Any]:
    """Caption every image under `inputs` that has no row in `output` yet; returns the summary."""
    from capray import checkpoint

    start = time.time()
    # Everything that can make the job impossible is checked before any work starts.
    checkpoint.check(checkpoint_uri, cfg.storage)
    images = list_inputs(cfg, inputs)
    try:
        done = set(read_columns(output, ["image"], cfg.storage)["image"].to_pylist())
    except OSError as e:
        raise InputError(f"cannot read the output folder {output}: {e}") from None
    todo = [u for u in images if u not in done]
    if cfg.infer.limit:
        todo = todo[: cfg.infer.limit]
    summary: dict[str, Any] = {"images": len(images), "already_done": len(images) - len(set(images) - done)}
    if todo:
        ds = uri_dataset(todo, cfg.infer.batch_size)
        ds = ds.map_batches(
            partial(load_batch, storage_cfg=cfg.storage, max_pixels=cfg.data.max_pixels),
            batch_size=cfg.infer.batch_size,
            num_cpus=0.5,  # kept out of the actor, as in capray.features.extract
        )
        ds = ds.map_batches(
            CaptionPredictor,
            fn_constructor_kwargs=dict(
                checkpoint_uri=checkpoint_uri, storage_cfg=cfg.storage, infer_cfg=cfg.infer, model_cfg=cfg.model
            ),
            batch_size=cfg.infer.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=cfg.infer.min_actors, max_size=cfg.infer.max_actors),
            num_gpus=cfg.infer.num_gpus,
        )
        schema = SCHEMA.append(ATTENTION_FIELD) if cfg.infer.attention else SCHEMA
        # A caption row is ~200 bytes; with attention, 64 float32 per step (up to 64 steps).
        row_bytes = 256 + (64 * 4 * 64 if cfg.infer.attention else 0)
        ds = bound_memory(ds, cfg, cfg.infer.batch_size, cfg.infer.max_actors, 2 * cfg.infer.rows_per_file * row_bytes)
        try:
            ds.write_datasink(AtomicParquetSink(output, schema, cfg.storage, rows_per_file=cfg.infer.rows_per_file))
        except Exception as e:  # Ray wraps the worker's error (e.g. OSError from S3) in its own types
            raise CaptionJobError(
                f"caption job stopped before every image was written to {output} ({_root_cause(e)}); "
                "the files already there are complete and kept: re-run the same command to caption the rest"
            ) from e
    rows = read_columns(output, ["image", "error"], cfg.storage)
    new = rows.filter(pc.is_in(rows["image"], pa.array(todo, pa.string())))
    # Exactly once: a retried write replaces its file (capray.parquet), so this stays 0.
    duplicates = new.num_rows - len(pc.unique(new["image"]))
    failed = new.num_rows - new["error"].null_count
    seconds = time.time() - start
    summary.update(
        written=new.num_rows,
        captioned=new.num_rows - failed,
        failed=failed,
        remaining=len(images) - summary["already_done"] - new.num_rows + duplicates,
        duplicates=duplicates,
        seconds=round(seconds, 1),
        images_per_s=round(new.num_rows / max(seconds, 1e-9), 1),
        output=output,
    )
    return summary


def run(cfg: Any) -> dict[str, Any]:
    """`capray caption`: caption `infer.input` with the configured (or best) checkpoint."""
    from capray.config import output_paths, save_next_to
    from capray.train import best_checkpoint

    if not cfg.infer.input:
        raise InputError("infer.input is empty: give a folder, s3:// prefix or manifest to caption")
    out = output_paths(cfg)["captions"]
    s = caption(cfg, best_checkpoint(cfg), cfg.infer.input, out)
    save_next_to(cfg, out)
    if not s["written"]:
        print(f"[capray] caption: nothing to do: all {s['images']} images already have a row in {out}", flush=True)
    else:
        print(
            f"[capray] caption: {s['images']} images, {s['already_done']} already done, {s['written']} rows written "
            f"({s['captioned']} captioned, {s['failed']} failed), {s['remaining']} left; "
            f"{s['seconds']} s, {s['images_per_s']} images/s -> {out}",
            flush=True,
        )
    if s["duplicates"]:
        print(f"[capray] caption: WARNING {s['duplicates']} duplicate rows in {out}", flush=True)
    return s
