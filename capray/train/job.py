"""The training job's driver: split, tokenizer and feature checks, Ray datasets, the TensorflowTrainer.

`train(cfg)` pairs every caption of the split with its image's features (Ray Data; the driver
holds the split file's URI and the vocabulary, never the captions), launches
`train_loop_per_worker` (capray.train.loop) on `ray.num_workers` workers and returns the best
checkpoint; a run that fails for good raises `TrainingError` naming the checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import ray.train
from omegaconf import OmegaConf
from ray.data import Dataset
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

# After capray.train.loop (capray.model): ray.train.tensorflow imports TensorFlow, which
# capray.model imports first with its start-up noise filtered.
from ray.train.tensorflow import TensorflowTrainer

from capray import checkpoint as ckpt
from capray import storage
from capray.config import check_training, output_paths, to_yaml
from capray.data import DataError, count_vocabulary, prepare_split, split_rows
from capray.featurestore import (
    FeatureError,
    caption_dataset,
    feature_stats,
    file_list_uri,
    read_features,
    side_features,
)
from capray.featurestore import verify as verify_features
from capray.text import Tokenizer
from capray.train.backend import MultiWorkerConfig
from capray.train.loop import train_loop_per_worker
from capray.train.sharding import SplitValidation

if TYPE_CHECKING:
    from ray.train.tensorflow import TensorflowConfig

    from capray.schema import Config

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped for good; the message names the last good checkpoint."""


def prepare_tokenizer(cfg: Config, split_uri: str) -> Tokenizer:
    """Fit the tokenizer on the split's training captions once (counted by Ray Data: the driver
    holds the vocabulary, not the captions); later runs reuse the saved one."""
    uri = output_paths(cfg)["tokenizer"]
    if storage.exists(uri, cfg.storage):
        return Tokenizer.from_json(storage.read_bytes(uri, cfg.storage).decode("utf-8"))
    tokenizer = count_vocabulary(split_uri, cfg.storage, cfg.text.vocab_size, cfg.text.max_length)
    storage.write_bytes(uri, tokenizer.to_json().encode("utf-8"), cfg.storage)
    return tokenizer


# Identifies the statistics file's layout; a file of another format is computed again.
STATS_FORMAT = "capray-feature-stats/1"


def prepare_feature_stats(cfg: Config, features: Dataset, split_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the split's training images, each (2048,).

    The pass over every training image's features is made once per features folder and split:
    `feature_stats.json` keeps its result with the versions (size and ETag, generation or mtime)
    of the file list and the split file it was taken from, and a later run (resumed, or under
    another name) reuses it while both are unchanged. Every `capray extract` writes a new version
    of the file list (with the time it was written), so features that may have changed are never
    normalised with stale statistics. A folder without a file list (an extraction killed before
    its end) is never reused.
    """
    from capray.listing import stat

    def version(file: str) -> str:
        return f"{file}@{':'.join(map(str, stat(file, cfg.storage)))}"

    uri = output_paths(cfg)["stats"]
    file_list = file_list_uri(output_paths(cfg)["features"], cfg.storage)
    source = {"features": version(file_list) if file_list else None, "split": version(split_uri)}
    if file_list and storage.exists(uri, cfg.storage):
        saved = json.loads(storage.read_bytes(uri, cfg.storage))
        if saved.get("format") == STATS_FORMAT and saved.get("source") == source:
            log.info(f"train: feature statistics of {saved['images']} training images reused from {uri}")
            return np.array(saved["mean"], np.float32), np.array(saved["std"], np.float32)
    mean, std, images = feature_stats(side_features(features, split_uri, cfg.storage, "train"))
    if not images:  # the workers would fail on statistics of nothing, before their own check
        raise FeatureError(
            f"none of the split's training images has features in {output_paths(cfg)['features']}: were the "
            "features extracted from the split's images (`capray extract` with this config)?"
        )
    if file_list:
        saved = {"format": STATS_FORMAT, "source": source, "images": images, "mean": mean.tolist(), "std": std.tolist()}
        storage.write_bytes(uri, json.dumps(saved).encode("utf-8"), cfg.storage)
        log.info(f"train: feature statistics of {images} training images saved to {uri}")
    return mean, std


def checked_features(cfg: Config) -> Dataset:
    """The extracted features of the config's work dir, verified against their file list (`_files.json`)."""
    uri = output_paths(cfg)["features"]
    if not storage.exists(uri, cfg.storage):
        raise FeatureError(f"no features at {uri}: run `capray extract` with the same config first")
    verify_features(uri, cfg.storage)
    return read_features(uri, cfg.storage)


def split_captions(split_uri: str, storage_cfg: Any) -> dict[str, int]:
    """The split's number of captions on each side (from its footer)."""
    return {side: split_rows(split_uri, storage_cfg, side) for side in ("train", "val")}


def check_split_size(cfg: Config, split_uri: str) -> None:
    """A split too small to train on stops the job before any work: fewer training captions than
    one batch run no step (the workers drop a short last batch), and no validation caption gives
    a validation loss of 0."""
    captions = split_captions(split_uri, cfg.storage)
    if captions["train"] < cfg.train.batch_size or not captions["val"]:
        raise DataError(
            f"{split_uri}: {captions['train']} training and {captions['val']} validation captions: training needs "
            f"at least train.batch_size={cfg.train.batch_size} and validation one (data.val_fraction, or more captions)"
        )


def build_datasets(cfg: Config, features: Dataset, split_uri: str, tokenizer: Tokenizer) -> tuple[dict, dict]:
    """The training and validation Ray datasets (caption ids + features) and the workers' loop
    config. The split reaches the tasks as its file's URI: each pairs its features with their
    captions read from the split file, so what a task receives does not grow with the captions."""
    captions = split_captions(split_uri, cfg.storage)
    loop_config: dict[str, Any] = {
        "cfg": to_yaml(cfg),
        "tokenizer": tokenizer.to_json(),
        "train_captions": captions["train"],
        "val_captions": captions["val"],
        # The saved config has no credentials; workers get them in memory only.
        "storage": OmegaConf.create(OmegaConf.to_container(cfg.storage)),
    }
    if cfg.model.feature_norm == "channel":
        mean, std = prepare_feature_stats(cfg, features, split_uri)
        loop_config.update(feature_mean=mean.tolist(), feature_std=std.tolist())
    data = {side: caption_dataset(features, split_uri, cfg.storage, side, tokenizer) for side in ("train", "val")}
    return data, loop_config


def build_trainer(
    cfg: Config, data: dict, loop_config: dict, loop: Callable[[dict], None] = train_loop_per_worker
) -> TensorflowTrainer:
    """The Ray Train TensorflowTrainer of the config: workers, checkpoints kept, restarts allowed."""
    fs, runs = storage.filesystem(output_paths(cfg)["runs"], cfg.storage)
    return TensorflowTrainer(
        loop,
        train_loop_config=loop_config,
        # Ray's own TensorflowConfig would import TensorFlow in the controller (capray.train.backend);
        # its annotation names that class, the trainer takes any BackendConfig.
        tensorflow_config=cast("TensorflowConfig", MultiWorkerConfig()),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=runs,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep or None),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=data,
        dataset_config=SplitValidation(),
    )


def fit(cfg: Config, job: TensorflowTrainer) -> None:
    """Run the trainer; a run that fails for good becomes a TrainingError naming where to resume."""
    try:
        job.fit()
    except ray.train.TrainingFailedError as e:
        # A worker that found the features do not cover the split (capray.train.loop.coverage):
        # the same on a re-run, so its own one line, not "resume from the last checkpoint".
        for failure in getattr(e, "worker_failures", {}).values():
            if isinstance(failure, FeatureError):
                raise FeatureError(str(failure)) from None
        last = latest_checkpoint(cfg)
        raise TrainingError(
            f"training run '{cfg.name}' failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the last good checkpoint is {last or 'none (no epoch completed)'}: re-run the same command to "
            f"resume from it, or set train.max_failures (now {cfg.train.max_failures}) to restart failed workers"
        ) from e


def train(cfg: Config) -> dict[str, Any]:
    """Train on the extracted features of the split; returns the best checkpoint and its metrics."""
    check_training(cfg)
    split_uri = prepare_split(cfg)
    check_split_size(cfg, split_uri)
    tokenizer = prepare_tokenizer(cfg, split_uri)
    data, loop_config = build_datasets(cfg, checked_features(cfg), split_uri, tokenizer)
    fit(cfg, build_trainer(cfg, data, loop_config))
    summary = json.loads(storage.read_bytes(output_paths(cfg)["best"], cfg.storage))
    summary["loss_plot"] = write_loss_plot(cfg, summary["checkpoint"])
    return summary


def write_loss_plot(cfg: Config, best: str) -> str:
    """`loss.png` of the whole run (from its TensorBoard events) next to the best checkpoint."""
    from capray.train import curves

    uri = storage.join(best, "loss.png")
    points = curves.read(output_paths(cfg)["tensorboard"], cfg.storage)
    storage.write_bytes(uri, curves.loss_png(points, f"run {cfg.name}"), cfg.storage)
    return uri


def latest_checkpoint(cfg: Config) -> str | None:
    """The run's most recent complete epoch checkpoint (by its state.json), or None."""
    run_dir = storage.join(output_paths(cfg)["runs"], cfg.name)
    states = [u for u in storage.list_files(run_dir, cfg.storage, ("state.json",)) if "/checkpoint_" in u]
    epochs = {u.rsplit("/", 1)[0]: json.loads(storage.read_bytes(u, cfg.storage))["epoch"] for u in states}
    for uri in sorted(epochs, key=lambda u: epochs[u], reverse=True):
        try:
            ckpt.check(uri, cfg.storage)  # a copy cut short by the failure may lack files
        except ckpt.CheckpointError:
            continue
        return uri
    return None


def run(cfg: Config) -> dict[str, Any]:
    """`capray train`: train, log where the best checkpoint is, and return it with its metrics."""
    summary = train(cfg)
    m = summary["metrics"]
    log.info(f"train: best checkpoint {summary['checkpoint']} (epoch {m['epoch']}, val_loss {m['val_loss']:.4f})")
    log.info(
        f"train: loss curves {summary['loss_plot']}; TensorBoard: tensorboard --logdir {output_paths(cfg)['tensorboard']}"
    )
    return summary
