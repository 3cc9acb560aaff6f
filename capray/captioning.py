"""Bulk captioning job: any input (capray.inputs) -> caption rows in Parquet, one file per shard.

Pipeline: shards -> an actor pool whose actors hold InceptionV3 and the decoder (features never
leave the actor) -> `<output>/<shard id>.parquet` (capray.pipeline). Every input image yields
exactly one row, with the input's other columns passed through; unreadable images get `error`
set and no caption. A re-run skips the shards that already have their file, redoes the ones
whose input changed (copying the captions of unchanged images), and refuses an output folder made
from another input or with other settings (checkpoint, decoding, precision) unless overwriting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from capray import inputs, pipeline, shards, storage
from capray.batch_model import ImageBatchModel
from capray.inputs import InputError
from capray.schema import CaptionConfig, DataConfig, ModelConfig

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)
# The documented output schema (docs/outputs.md); explicit so all-null columns keep types.
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
# Optional column (caption.attention=true): per emitted word, its 64 attention weights.
ATTENTION_FIELD = pa.field("attention", pa.list_(pa.list_(pa.float32())))


class CaptionJobError(pipeline.JobError):
    """The caption job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


__all__ = ["SCHEMA", "CaptionJobError", "CaptionPredictor", "InputError", "caption", "run"]


class CaptionPredictor(ImageBatchModel):
    """Ray Data callable class: images -> caption rows (greedy or beam), the model loaded once per actor.

    The caption job's actor, and a building block for your own Ray Data pipelines:

        ds.map_batches(capray.CaptionPredictor, fn_constructor_kwargs={"checkpoint": uri},
                       batch_size=16, concurrency=2, num_gpus=1)

    on a dataset with an `image` column of image bytes or URIs (`image_column=` names another),
    or a `pixels` column. Rows: caption, log_prob, num_tokens, strategy, model, error (a bad image
    gets `error` set and no caption), [attention], then the batch's other columns.
    """

    def __init__(
        self,
        checkpoint: str,
        strategy: str = CaptionConfig.strategy,
        beam_size: int = CaptionConfig.beam_size,
        length_alpha: float = CaptionConfig.length_alpha,
        max_length: int = CaptionConfig.max_length,
        attention: bool = CaptionConfig.attention,
        precision: str = ModelConfig.precision,
        jit_compile: bool = ModelConfig.jit_compile,
        storage: Any = None,
        image_column: str = "image",
        max_pixels: int = DataConfig.max_pixels,
    ):
        from capray import checkpoint as ckpt
        from capray.decoder import Decoder
        from capray.model import Backbone, gpu_memory_growth, set_precision

        gpu_memory_growth()
        set_precision(precision)  # before the model and backbone are built
        self.storage_cfg, self.image_column, self.max_pixels = storage, image_column, max_pixels
        model, self.tokenizer, train_cfg, _ = ckpt.load(checkpoint, storage)
        # The backbone must be the one the training features came from; XLA may compile it
        # (the decoder's loops stop early with data-dependent shapes, which XLA cannot compile).
        self.backbone = Backbone(train_cfg.backbone.weights, train_cfg.backbone.seed, storage, jit_compile=jit_compile)
        self.decoder = Decoder(model, self.tokenizer, strategy, max_length, beam_size, length_alpha)
        self.model_id, self.attention, self.strategy = checkpoint, attention, self.decoder.label

    @staticmethod
    def arguments(cfg: Config, checkpoint: str) -> dict[str, Any]:
        """Constructor arguments from a job config (its caption, model and storage sections)."""
        i = cfg.caption
        return dict(
            checkpoint=checkpoint,
            strategy=i.strategy,
            beam_size=i.beam_size,
            length_alpha=i.length_alpha,
            max_length=i.max_length,
            attention=i.attention,
            precision=cfg.model.precision,
            jit_compile=cfg.model.jit_compile,
            storage=cfg.storage,
            max_pixels=cfg.data.max_pixels,
        )

    def caption_pixels(self, pixels: np.ndarray) -> list[Any]:
        """(B, 299, 299, 3) uint8 -> B `capray.decoder.Caption`s (text, log-prob, token count, attention)."""
        return self.decoder(self.backbone(pixels))

    def rows(self, keys: list[str | None], pixels: np.ndarray, errors: list[str]) -> pa.Table:
        """One caption row per image; an image with an error gets the error and no caption."""
        n = len(keys)
        ok = np.array([not e for e in errors], dtype=bool)
        captions: list[str | None] = [None] * n
        log_probs: list[float | None] = [None] * n
        num_tokens: list[int | None] = [None] * n
        attention: list[list | None] = [None] * n
        if ok.any():
            for i, c in zip(np.flatnonzero(ok), self.caption_pixels(pixels[ok])):
                captions[i], log_probs[i], num_tokens[i] = c.text, c.log_prob, c.num_tokens
                attention[i] = c.token_attention.tolist() if self.attention else None
        columns = {
            "image": keys,
            "caption": captions,
            "log_prob": log_probs,
            "num_tokens": num_tokens,
            "strategy": [self.strategy] * n,
            "model": [self.model_id] * n,
            "error": [e or None for e in errors],
        }
        schema = SCHEMA
        if self.attention:
            columns["attention"] = attention
            schema = SCHEMA.append(ATTENTION_FIELD)
        return pa.table(columns, schema=schema)


def settings(cfg: Config, checkpoint_uri: str) -> dict[str, Any]:
    """What the captions depend on besides the input: recorded with every shard, compared on re-runs."""
    from capray.listing import stat

    size, version = stat(storage.join(checkpoint_uri, "model.weights.h5"), cfg.storage)
    i = cfg.caption
    out = {
        "checkpoint": checkpoint_uri,
        "checkpoint weights (size:version)": f"{size}:{version}",
        "caption.strategy": i.strategy,
        "caption.max_length": i.max_length,
        "caption.attention": i.attention,
        "model.precision": cfg.model.precision,
        "data.max_pixels": cfg.data.max_pixels,
    }
    if i.strategy == "beam":
        out.update({"caption.beam_size": i.beam_size, "caption.length_alpha": i.length_alpha})
    return out


def job_plan(cfg: Config) -> inputs.Plan:
    """The caption job's input (`caption.input`) as shards."""
    from capray.config import output_paths

    paths = output_paths(cfg)
    return inputs.plan(cfg, cfg.caption.input, paths["inputs"], paths["captions"])


def caption(cfg: Config, checkpoint_uri: str, input_uri: str, output: str) -> dict[str, Any]:
    """Caption every shard of `input_uri` that `output` does not hold yet; returns the summary."""
    from capray import checkpoint
    from capray.config import output_paths

    # Everything that can make the job impossible is checked before any work starts.
    checkpoint.check(checkpoint_uri, cfg.storage)
    if cfg.caption.overwrite and not cfg.inputs.dry_run:
        shards.clear(output, overwrite_keeps(cfg, input_uri, checkpoint_uri), cfg.storage, "caption.overwrite")
    plan = inputs.plan(cfg, input_uri, output_paths(cfg)["inputs"], output)
    schema = SCHEMA.append(ATTENTION_FIELD) if cfg.caption.attention else SCHEMA
    kwargs = CaptionPredictor.arguments(cfg, checkpoint_uri)
    summary = pipeline.run(
        cfg,
        plan,
        output,
        CaptionPredictor,
        kwargs,
        cfg.caption,
        schema,
        "caption",
        error_cls=CaptionJobError,
        settings=settings(cfg, checkpoint_uri),
    )
    if not summary.get("dry_run"):
        summary["captioned"] = summary["written"] - summary["failed"]
    return summary


def overwrite_keeps(cfg: Config, input_uri: str, checkpoint_uri: str) -> dict[str, str]:
    """What `caption.overwrite` must never delete with the output folder."""
    return {"caption.input": input_uri, "work_dir": cfg.work_dir, "checkpoint": checkpoint_uri}


def require_input(cfg: Config) -> None:
    """InputError unless the job has an input to caption."""
    if not cfg.caption.input:
        raise InputError(
            "caption.input is empty: give a folder, s3:// gs:// az:// prefix, manifest(s), .tar shards or Parquet files to caption"
        )


def run(cfg: Config) -> dict[str, Any]:
    """`capray caption`: caption `caption.input` with the configured (or best) checkpoint."""
    from capray.checkpoint import best_checkpoint
    from capray.config import output_paths, save_next_to

    require_input(cfg)
    out = output_paths(cfg)["captions"]
    s = caption(cfg, best_checkpoint(cfg), cfg.caption.input, out)
    if s.get("dry_run"):
        for line in pipeline.plan_lines("caption", s["plan"]):
            log.info(line)
        return s
    save_next_to(cfg, out)
    images = "" if s["images"] is None else f"{s['images']} images in "
    if not s["shards_written"]:
        log.info(f"caption: nothing to do: all {images}{s['shards']} shards already have their file in {out}")
    else:
        copied = f", {s['copied']} of them copied unchanged from the files they replace" if s["copied"] else ""
        done = f" ({s['already_done']} images)" if s["already_done"] is not None else ""
        log.info(
            f"caption: {images}{s['shards']} shards, {s['shards_done_before']} already done{done}, "
            f"{s['shards_written']} written ({s['written']} rows: {s['written'] - s['failed']} captioned, {s['failed']} failed{copied}), "
            f"{s['remaining_shards']} shards left; {s['seconds']} s, {s['images_per_s']} images/s -> {out}"
        )
        for key, err in s["errors"][:5]:
            log.warning("caption: failed: %s: %s", key, err)
    if s["duplicates"]:
        log.info("caption: %d repeated images in the input were captioned once", s["duplicates"])
    for line in pipeline.report_lines("caption", s):
        log.info(line)
    return s
