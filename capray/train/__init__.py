"""Distributed training job: Ray Train TensorflowTrainer + MultiWorkerMirroredStrategy custom loop.

job.py is the driver (split, tokenizer, feature checks, Ray datasets, the trainer); loop.py is
what every worker runs (`train_loop_per_worker`, the compiled step, restore, reporting);
sharding.py how the datasets reach the workers; backend.py how the workers find each other.

The names below load their module on first use: a process that unpickles a TensorFlow-free
part of this package (sharding.py in Ray Train's DatasetManager, backend.py in its controller)
must not import job.py and loop.py, which load TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capray import lazy_getattr

if TYPE_CHECKING:
    from capray.train.job import TrainingError, latest_checkpoint, prepare_tokenizer, run, train
    from capray.train.loop import BatchCache, make_eval_step, make_train_step, restore, train_loop_per_worker

_HOME = {
    "TrainingError": "capray.train.job",
    "latest_checkpoint": "capray.train.job",
    "prepare_tokenizer": "capray.train.job",
    "run": "capray.train.job",
    "train": "capray.train.job",
    "BatchCache": "capray.train.loop",
    "make_eval_step": "capray.train.loop",
    "make_train_step": "capray.train.loop",
    "restore": "capray.train.loop",
    "train_loop_per_worker": "capray.train.loop",
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

__getattr__ = lazy_getattr(globals(), _HOME)
