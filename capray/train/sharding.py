"""How Ray Train gives each training worker its part of the datasets (the trainer's `dataset_config`).

TensorFlow-free on purpose: Ray Train's DatasetManager actor unpickles this class, and a class
of capray.train.loop would make that process import TensorFlow (seconds of CPU and hundreds of
MB per training run) for nothing (tests/test_imports.py).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.train import DataConfig


class SplitValidation(DataConfig):
    """`train` split equally, `val` into disjoint parts that together hold every caption once.

    Every worker must run the same number of training steps (each is an all-reduce), so `train`
    keeps Ray Train's equal split, which drops the rows that do not divide evenly. Validation
    must see every caption exactly once, so `val` is split with `equal=False`: parts of unequal
    size, each worker validating its own (capray.train.loop.Reporter.validate sums them).
    """

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train", "val"])

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Ray Train asks for each dataset's iterators per worker rank (Train V2: one dataset per call)."""
        equal = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            if datasets["val"].name is None:
                datasets["val"].set_name("val")
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, part in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i]["val"] = part
        return output
