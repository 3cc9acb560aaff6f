"""Distributed training job: Ray Train TensorflowTrainer + MultiWorkerMirroredStrategy custom loop.

job.py is the driver (split, tokenizer, feature checks, Ray datasets, the trainer); loop.py is
what every worker runs (`train_loop_per_worker`, the compiled step, restore, reporting).
"""

from capray.train.job import TrainingError, latest_checkpoint, prepare_tokenizer, run, train
from capray.train.loop import BatchCache, make_eval_step, make_train_step, restore, train_loop_per_worker

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
