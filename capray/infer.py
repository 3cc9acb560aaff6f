"""Bulk captioning job: any input (capray.inputs) -> caption rows in Parquet, one file per shard.

Pipeline: shards -> an actor pool whose actors hold InceptionV3 and the decoder (features never
leave the actor) -> `<output>/<shard id>.parquet` (capray.pipeline). Every input image yields
exactly one row, with the input's other columns passed through; unreadable images get `error`
set and no caption. A re-run skips the shards that already have their file.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from capray import inputs, pipeline
from capray.inputs import InputError

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


class CaptionJobError(pipeline.JobError):
    """The caption job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


__all__ = ["SCHEMA", "CaptionPredictor", "CaptionJobError", "InputError", "caption", "caption_image", "run"]


class CaptionPredictor:
    """Ray Data callable class: pixels -> captions (greedy or beam), the model loaded once per actor."""

    def __init__(self, checkpoint_uri: str, storage_cfg: Any, infer_cfg: Any, model_cfg: Any = None):
        """`model_cfg`: the running job's `model` section (precision, jit_compile); None = float32, no XLA."""
        import tensorflow as tf

        from capray import checkpoint
        from capray.model import FEATURE_DIM, NUM_CELLS, ImageEncoder, gpu_memory_growth, set_precision

        gpu_memory_growth()
        jit = bool(model_cfg and model_cfg.jit_compile)
        set_precision(model_cfg.precision if model_cfg else "float32")  # before the model and backbone are built
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


def caption(cfg: Any, checkpoint_uri: str, input_uri: str, output: str) -> dict[str, Any]:
    """Caption every shard of `input_uri` that has no file in `output` yet; returns the summary."""
    from capray import checkpoint
    from capray.config import output_paths

    # Everything that can make the job impossible is checked before any work starts.
    checkpoint.check(checkpoint_uri, cfg.storage)
    plan = inputs.plan(cfg, input_uri, output_paths(cfg)["inputs"])
    schema = SCHEMA.append(ATTENTION_FIELD) if cfg.infer.attention else SCHEMA
    try:
        pipeline.done_ids(output, cfg.storage)
    except OSError as e:
        raise InputError(f"cannot read the output folder {output}: {e}") from None
    kwargs = dict(checkpoint_uri=checkpoint_uri, storage_cfg=cfg.storage, infer_cfg=cfg.infer, model_cfg=cfg.model)
    summary = pipeline.run(cfg, plan, output, CaptionPredictor, kwargs, cfg.infer, schema, "caption", error_cls=CaptionJobError)
    summary["captioned"] = summary["written"] - summary["failed"]
    return summary


def run(cfg: Any) -> dict[str, Any]:
    """`capray caption`: caption `infer.input` with the configured (or best) checkpoint."""
    from capray.config import output_paths, save_next_to
    from capray.checkpoint import best_checkpoint

    if not cfg.infer.input:
        raise InputError("infer.input is empty: give a folder, s3:// prefix, manifest(s), .tar shards or Parquet files to caption")
    out = output_paths(cfg)["captions"]
    s = caption(cfg, best_checkpoint(cfg), cfg.infer.input, out)
    save_next_to(cfg, out)
    images = "" if s["images"] is None else f"{s['images']} images in "
    if not s["shards_written"]:
        print(f"[capray] caption: nothing to do: all {images}{s['shards']} shards already have their file in {out}", flush=True)
    else:
        print(
            f"[capray] caption: {images}{s['shards']} shards, {s['shards_done_before']} already done, "
            f"{s['shards_written']} written ({s['written']} rows: {s['written'] - s['failed']} captioned, {s['failed']} failed), "
            f"{s['remaining_shards']} shards left; {s['seconds']} s, {s['images_per_s']} images/s -> {out}",
            flush=True,
        )
        for key, err in s["errors"][:5]:
            print(f"[capray] caption: failed: {key}: {err}", flush=True)
    if s["duplicates"]:
        print(f"[capray] caption: {s['duplicates']} repeated images in the input were captioned once", flush=True)
    for line in pipeline.report_lines("caption", s):
        print(line, flush=True)
    return s
