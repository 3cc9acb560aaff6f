"""How the training workers find each other: Ray Train's TensorFlow backend (the trainer's
`tensorflow_config`), from a module that does not import TensorFlow.

Ray's own `TensorflowConfig` lives in the package `ray.train.tensorflow`, which imports TensorFlow
when it loads. Ray Train's controller actor unpickles the backend config, so with Ray's class every
training run's controller imported TensorFlow (about 3 CPU-s and hundreds of MB) only to set an
environment variable on the workers. This is the same backend: before the training function
starts, every worker gets `TF_CONFIG` naming all the workers' addresses in rank order, which
`tf.distribute.MultiWorkerMirroredStrategy` reads (tests/test_imports.py keeps this module
TensorFlow-free). Unlike Ray's it does not set `TF_USE_LEGACY_KERAS=1`, which asks TensorFlow for
the `tf_keras` package: capray uses Keras 3 and does not install `tf_keras`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ray
from ray._common.network_utils import build_address
from ray.train import BackendConfig
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend
from ray.train.v2._internal.util import TrainingFramework


def _address() -> str:
    return build_address(*get_address_and_port())  # this node's IP and a free port on it


def _set_tf_config(addresses: list[str], index: int) -> None:
    cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    os.environ["TF_CONFIG"] = json.dumps(cluster)


class _MultiWorkerBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        addresses = worker_group.execute(_address)
        ray.get(
            [
                worker_group.execute_single_async(rank, _set_tf_config, addresses=addresses, index=rank)
                for rank in range(len(worker_group))
            ]
        )


class MultiWorkerConfig(BackendConfig):
    """`TF_CONFIG` on every worker, as Ray's `TensorflowConfig` sets it."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _MultiWorkerBackend

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TENSORFLOW  # Ray Train's run state: the workers' TensorFlow version
