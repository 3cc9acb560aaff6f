"""Connecting to Ray (the one place that decides local instance vs. existing cluster), and the
Ray Data plumbing shared by the image jobs (extraction, captioning)."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

WORKER_ENV = {
    # Workers import TensorFlow too; keep its C++ banner out of every job log.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KERAS_BACKEND": "tensorflow",
    # Train V2 turns print() into root-logger records; TensorFlow's absl handler on the root
    # logger then prints every epoch line twice. Plain stdout is streamed to the driver once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def init_ray(cfg: Any) -> None:
    """Join `ray.address` (or RAY_ADDRESS, e.g. under `ray job submit`), else start Ray locally."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": WORKER_ENV}, "logging_level": logging.WARNING}
    if address is None and cfg.ray.local_cpus:
        kwargs["num_cpus"] = cfg.ray.local_cpus
    ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def bound_memory(ds: "ray.data.Dataset", cfg: Any, batch_size: int, max_actors: int, output_bytes: int) -> "ray.data.Dataset":
    """Cap the object store memory of an image job at `ray.inflight_batches` decoded batches per
    actor plus `output_bytes` (what the Parquet sink buffers), so memory does not grow with the
    number of images.

    By default Ray Data lets a fast stage (decoding) run ahead of a slow one (the model) until half
    the object store is full: gigabytes of decoded pixels on a large input, for no gain in speed.
    """
    from capray.images import IMAGE_SIZE

    pixels = cfg.ray.inflight_batches * batch_size * max_actors * IMAGE_SIZE * IMAGE_SIZE * 3
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=pixels + output_bytes)
    return ds


def uri_dataset(uris: list[str], batch_size: int) -> "ray.data.Dataset":
    """{image: uri} rows in blocks of exactly `batch_size` rows (the last one may be shorter).

    `from_items` alone splits a small input into ~200 blocks of a few rows, and `map_batches`
    does not batch across block bundles evenly: a 498-image job reached the model as alternating
    batches of 16 and 2 images. Aligned blocks give the model full batches (and one trace).
    """
    ds = ray.data.from_items([{"image": uri} for uri in uris])
    return ds.repartition(target_num_rows_per_block=batch_size, strict=True)
