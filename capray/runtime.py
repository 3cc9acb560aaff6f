"""Connecting to Ray: the one place that decides local instance vs. existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray
from ray.util.debug import log_once

from capray import logs

if TYPE_CHECKING:
    from capray.schema import Config

WORKER_ENV = {
    # Workers import TensorFlow too: its C++ INFO and WARNING logs stay out of every job log
    # (its start-up banners ignore this: capray.tfquiet filters those).
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KERAS_BACKEND": "tensorflow",
    # GPU memory on demand instead of ~all of it per process: actors sharing a GPU
    # (fractional num_gpus) must each find room (see capray.model.gpu_memory_growth).
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    # Train V2 turns print() into root-logger records; TensorFlow's absl handler on the root
    # logger then prints every epoch line twice. Plain stdout is streamed to the driver once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}

# Ray Data's Parquet reader reads the files' footers on a pool of actors that it starts for each
# read (each pass of a training dataset, the feature statistics, a split count) and kills after:
# 32 by default, each a new worker process of ~1 CPU-second. On 2 cores a whole pass over 3,000
# files took 44-52 s from moto S3 with 2 actors and 67-69 s with 32 (bench/footers.py); a big
# cluster may want more: a value already in the driver's environment wins (Ray reads it in the
# process that calls read_parquet), and footer_readers_for trims it for a small folder.
FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_ACTORS_DEFAULT = "2"
# Ray's own defaults, as its Parquet reader reads them: the pool size, and the files it hands a
# footer reader per call.
RAY_FOOTER_ACTORS = 32
FOOTER_BATCH = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"
RAY_FOOTER_BATCH = 10
_footer_lock = threading.Lock()


@contextlib.contextmanager
def footer_readers_for(files: int | None) -> Iterator[None]:
    """Around a `ray.data.read_parquet` of `files` Parquet files: a pool of footer readers no
    larger than the batches of footers there are to read. Each reader takes 10 files per call
    (`RAY_DATA_PARQUET_FOOTER_BATCH_SIZE`), so a folder of up to 10 files keeps one reader busy
    and the pool's others would start a worker process each for nothing. Never more readers than
    the pool configured (FOOTER_ACTORS); Ray reads the variable when `read_parquet` is called.
    `files=None` (not known) leaves the pool as configured."""
    pool = int(os.environ.get(FOOTER_ACTORS, RAY_FOOTER_ACTORS))
    per_call = int(os.environ.get(FOOTER_BATCH, RAY_FOOTER_BATCH))
    needed = pool if files is None else max(1, -(-files // per_call))
    if needed >= pool:
        yield
        return
    with _footer_lock:
        before = os.environ.get(FOOTER_ACTORS)
        os.environ[FOOTER_ACTORS] = str(needed)
        try:
            yield
        finally:
            if before is None:
                del os.environ[FOOTER_ACTORS]
            else:
                os.environ[FOOTER_ACTORS] = before


RUNTIME_ENV = {
    "env_vars": WORKER_ENV,
    # Before a worker runs anything: Ray Train's TensorFlow backend imports TensorFlow in its
    # workers before any capray code, so capray/__init__ alone would come too late there.
    "worker_process_setup_hook": "capray.runtime.setup_worker",
}


def setup_worker() -> None:
    """What every worker process of a capray Ray job does first (RUNTIME_ENV)."""
    from capray import tfquiet

    tfquiet.install()
    logs.worker_logging(os.environ.get(logs.WORKER_ENV))
    # Ray Train's own dataset set-up (its DatasetManager actor) sets this option of Ray Data's
    # and warns of it on the job's console, once per training run: nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    # The workers that run Ray Data (Ray Train's split coordinators) say it as the driver does (init_ray).
    log_once("ray_data_progress_manager_disabled")


def init_ray(cfg: Config) -> None:
    """Join `ray.address` (or RAY_ADDRESS, e.g. under `ray job submit`), else start Ray locally."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    # The workers print capray's records at the level this driver shows them (capray.logs).
    level = logs.worker_level()
    runtime_env = {**RUNTIME_ENV, "env_vars": {**WORKER_ENV, **({logs.WORKER_ENV: level} if level else {})}}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
    if address is None:
        if cfg.ray.local_cpus:
            kwargs["num_cpus"] = cfg.ray.local_cpus
        if not cfg.ray.local_dashboard:
            # Only ever turned off: Ray's default starts it when its packages are installed and
            # goes on without it otherwise, where include_dashboard=True would stop the job.
            kwargs["include_dashboard"] = False
    os.environ.setdefault(FOOTER_ACTORS, FOOTER_ACTORS_DEFAULT)
    ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's progress bars need tqdm, which capray does not install: asked for, they only
    # print "tqdm is not installed" and "A new progress UI is available" lines. The jobs print
    # their own progress (capray.progress). Ray says once per process that they are off ("To
    # enable, set ..."): marked as said, since a user who did would get those lines again.
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
