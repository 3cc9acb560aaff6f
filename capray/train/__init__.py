"""Distributed training job: Ray Train TensorflowTrainer + MultiWorkerMirroredStrategy custom loop.

job.py is the driver (split, tokenizer, feature checks, Ray datasets, the trainer); loop.py is
what every worker runs (`train_loop_per_worker`, the compiled step, restore, reporting);
sharding.py how the datasets reach the workers.

The names below load their module on first use: a process that unpickles a TensorFlow-free
part of this package (sharding.py, in Ray Train's DatasetManager) must not import job.py and
loop.py, which load TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capray.train.job import TrainingError, latest_checkpoint, prepare_tokenizer, run, train
    from capray.train.loop import BatchCache, make_eval_step, make_train_step, restore, train_loop_per_worker

_HOME = {
    "TrainingError": "job",
    "latest_checkpoint": "job",
    "prepare_tokenizer": "job",
    "run": "job",
    "train": "job",
    "BatchCache": "loop",
    "make_eval_step": "loop",
    "make_train_step": "loop",
    "restore": "loop",
    "train_loop_per_worker": "loop",
}

__all__ = [
    "BatchCache",
    "TrainingError",
    "latest_checkpoint",
    "make_eval_step",
    "make_train_step",
    "prepare_tokenizer",
    "restore",
    "run",
    "train",
    "train_loop_per_worker",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"capray.train.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
