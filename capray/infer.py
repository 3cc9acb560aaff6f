"""Bulk captioning job: a folder / bucket prefix / manifest of images -> caption rows in Parquet.

Pipeline (Ray Data): list URIs -> read + decode (stateless CPU tasks) -> one actor pool that holds
both InceptionV3 and the decoder (features never leave the actor) -> Parquet shards.
Every input image yields one row; unreadable images get `error` set and no caption.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from capray import storage
from capray.images import load_batch

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# The documented output schema (README "Output schemas"); explicit so all-null columns keep types.
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


class CaptionPredictor:
    """Ray Data callable class: pixels -> greedy captions, with the model loaded once per actor."""

    def __init__(self, checkpoint_uri: str, storage_cfg: Any, max_length: int):
        import tensorflow as tf

        from capray import checkpoint
        from capray.model import ImageEncoder

        self.model, self.tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, storage_cfg)
        # The backbone must be the one the training features came from.
        self.encoder = ImageEncoder(train_cfg.encoder.weights, train_cfg.encoder.seed, storage_cfg)
        self.model_id = checkpoint_uri
        steps = (max_length or self.tokenizer.max_length) - 1
        self._greedy = tf.function(lambda f: self.model.greedy(f, steps), reduce_retracing=True)

    def caption_features(self, features: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(B, 64, 2048) features -> captions, log-probs, token counts, attention (B, steps, 64)."""
        tokens, attention, log_prob, lengths = (t.numpy() for t in self._greedy(features))
        return [self.tokenizer.decode(row) for row in tokens], log_prob, lengths, attention

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        n = len(batch["image"])
        ok = np.array([not e for e in batch["error"]])
        captions: list[str | None] = [None] * n
        log_probs = np.full(n, np.nan, np.float32)
        num_tokens = np.zeros(n, np.int32)
        if ok.any():
            caps, lp, lengths, _ = self.caption_features(self.encoder(batch["pixels"][ok]))
            idx = np.flatnonzero(ok)
            for j, i in enumerate(idx):
                captions[i] = caps[j]
            log_probs[idx] = lp
            num_tokens[idx] = lengths
        return pa.table(
            {
                "image": list(batch["image"]),
                "caption": captions,
                "log_prob": [float(v) if ok[i] else None for i, v in enumerate(log_probs)],
                "num_tokens": [int(v) if ok[i] else None for i, v in enumerate(num_tokens)],
                "strategy": ["greedy"] * n,
                "model": [self.model_id] * n,
                "error": [e or None for e in batch["error"]],
            },
            schema=SCHEMA,
        )


def list_inputs(uri: str, storage_cfg: Any = None) -> list[str]:
    """Image URIs under a folder/prefix (by extension), or listed by a manifest (.csv/.parquet)."""
    if uri.endswith((".csv", ".parquet")):
        from capray.data import read_manifest

        return list(dict.fromkeys(read_manifest(uri, storage_cfg=storage_cfg)["image"]))
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(f"input not found: {uri}")
    return storage.list_files(uri, storage_cfg, IMAGE_EXTENSIONS)


def caption(cfg: Any, checkpoint_uri: str, inputs: str, output: str) -> dict[str, Any]:
    """Caption every image under `inputs` into Parquet at `output`; returns the summary."""
    from capray import checkpoint

    start = time.time()
    # Fail before any work when the model cannot be loaded.
    checkpoint.check(checkpoint_uri, cfg.storage)
    images = list_inputs(inputs, cfg.storage)
    ds = ray.data.from_items([{"image": uri} for uri in images])
    ds = ds.map_batches(
        partial(load_batch, storage_cfg=cfg.storage, max_pixels=cfg.data.max_pixels),
        batch_size=cfg.infer.batch_size,
        num_cpus=0.5,  # kept out of the actor, as in capray.features.extract
    )
    ds = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs=dict(checkpoint_uri=checkpoint_uri, storage_cfg=cfg.storage, max_length=cfg.infer.max_length),
        batch_size=cfg.infer.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.infer.min_actors, max_size=cfg.infer.max_actors),
        num_gpus=cfg.infer.num_gpus,
    )
    fs, path = storage.filesystem(output, cfg.storage)
    ds.write_parquet(path, filesystem=fs)
    rows = ray.data.read_parquet(path, filesystem=fs, columns=["error"]).to_pandas()
    failed = int(rows["error"].notna().sum())
    seconds = time.time() - start
    return {
        "images": len(images),
        "rows": len(rows),
        "captioned": len(rows) - failed,
        "failed": failed,
        "seconds": round(seconds, 1),
        "images_per_s": round(len(images) / max(seconds, 1e-9), 1),
        "output": output,
    }


def run(cfg: Any) -> dict[str, Any]:
    """`capray caption`: caption `infer.input` with the configured (or best) checkpoint."""
    from capray.config import output_paths, save_next_to
    from capray.train import best_checkpoint

    if not cfg.infer.input:
        raise ValueError("infer.input is empty: give a folder, s3:// prefix or manifest to caption")
    out = output_paths(cfg)["captions"]
    summary = caption(cfg, best_checkpoint(cfg), cfg.infer.input, out)
    save_next_to(cfg, out)
    print(
        f"[capray] caption: {summary['images']} images -> {summary['rows']} rows in {out} "
        f"({summary['captioned']} captioned, {summary['failed']} failed) in {summary['seconds']} s, "
        f"{summary['images_per_s']} images/s",
        flush=True,
    )
    return summary
