"""Checkpoint layout shared by training (writer) and captioning/evaluation (readers).

A checkpoint is a directory (local or object storage) holding:
  model.weights.h5   Keras weights (HDF5 arrays, no code)
  optimizer.npz      Adam slots, loaded with allow_pickle=False
  tokenizer.json     vocabulary and padded length
  config.yaml        the resolved training config, credentials removed
  state.json         completed epochs, global step, steps into the current epoch (mid-epoch
                     checkpoints) and the metrics reported with it
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from capray import listing, storage
from capray.config import from_yaml, to_yaml
from capray.text import Tokenizer

if TYPE_CHECKING:
    from capray.schema import Config

# What a model needs; optimizer.npz only matters for resuming training.
REQUIRED = ("model.weights.h5", "tokenizer.json", "config.yaml", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model being built."""


def write(directory: str, model: Any, optimizer: Any, tokenizer: Tokenizer, cfg: Config, state: dict) -> None:
    """Write every checkpoint file into a local directory."""
    os.makedirs(directory, exist_ok=True)
    model.save_weights(os.path.join(directory, "model.weights.h5"))
    np.savez(os.path.join(directory, "optimizer.npz"), *[np.asarray(v.numpy()) for v in optimizer.variables])
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_json())
    with open(os.path.join(directory, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    with open(os.path.join(directory, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)


def restore_weights(directory: str, model: Any, uri: str | None = None, hint: str = "") -> None:
    """Load a checkpoint's weights into a built model, refusing one of another shape clearly."""
    try:
        model.load_weights(os.path.join(directory, "model.weights.h5"))
    except Exception as e:  # noqa: BLE001 (shape mismatches surface as ValueError deep inside Keras)
        raise CheckpointError(
            f"checkpoint {uri or directory} does not fit a model with vocabulary {model.vocab_size}, "
            f"embedding_dim {model.embedding.output_dim}, units {model.units}: {e}{hint}"
        ) from None


def restore_optimizer(directory: str, optimizer: Any) -> None:
    """Load the optimizer state (Adam's slots, or SGD's step count) into an optimizer built for the same variables."""
    try:
        # allow_pickle=False: an object array (a pickle) in the file is refused, never executed.
        with np.load(os.path.join(directory, "optimizer.npz"), allow_pickle=False) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{directory}/optimizer.npz: unreadable optimizer state ({e})") from None
    if len(values) != len(optimizer.variables):
        raise CheckpointError(f"optimizer state has {len(values)} arrays, optimizer has {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)


def check(uri: str, storage_cfg: Any = None) -> None:
    """Fail fast, before any work starts, unless `uri` holds a complete checkpoint."""
    if not storage.exists(uri, storage_cfg):
        raise CheckpointError(f"checkpoint not found: {uri}")
    missing = [f for f in REQUIRED if not storage.exists(storage.join(uri, f), storage_cfg)]
    if missing:
        raise CheckpointError(
            f"{uri} is not a complete capray checkpoint: missing {', '.join(missing)}{_checkpoints_below(uri, storage_cfg)}"
        )


def _checkpoints_below(uri: str, storage_cfg: Any, most: int = 5, entries: int = 1000) -> str:
    """The best checkpoints below `uri` when it is the folder of a training run (`<run>/best`),
    of the runs (`<name>/best`) or a work_dir (`runs/<name>/best`): the usual slip of giving a
    folder above the checkpoint. Each folder's listing stops after `entries` entries: a bucket
    of images given by mistake is not listed to its end."""
    best = storage.join(uri, "best")
    if storage.exists(storage.join(best, "state.json"), storage_cfg):
        return f"; it is a training run's folder: its best checkpoint is {best}"
    for parent in (uri, storage.join(uri, "runs")):
        try:
            folders = [
                e.uri for e in itertools.islice(listing.walk(parent, storage_cfg, recursive=False), entries) if e.is_dir
            ]
        except OSError:  # no such folder
            continue
        found = [
            b for f in folders if storage.exists(storage.join(b := storage.join(f, "best"), "state.json"), storage_cfg)
        ]
        if found:
            more = f" and {len(found) - most} more" if len(found) > most else ""
            return f"; the best checkpoints of the training runs below it: {', '.join(found[:most])}{more}"
    return ""


def localize(uri: str, storage_cfg: Any = None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local directory with the checkpoint's files (downloaded when `uri` is remote)."""
    if not storage.is_remote(uri):
        return uri, None
    tmp = tempfile.TemporaryDirectory(prefix="capray-ckpt-")
    fs, path = storage.filesystem(uri, storage_cfg)
    pafs.copy_files(path, tmp.name, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp.name, tmp


def load(uri: str, storage_cfg: Any = None) -> tuple[Any, Tokenizer, Any, dict]:
    """Rebuild the captioning model from a checkpoint: (model, tokenizer, train config, state)."""
    from capray.model import ShowAttendTell  # TensorFlow only when a model is actually needed

    check(uri, storage_cfg)
    local, tmp = localize(uri, storage_cfg)
    try:
        with open(os.path.join(local, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer = Tokenizer.from_json(f.read())
        with open(os.path.join(local, "config.yaml"), encoding="utf-8") as f:
            cfg = from_yaml(f.read())
        with open(os.path.join(local, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        model = ShowAttendTell(tokenizer.vocab_size, cfg.model.embedding_dim, cfg.model.units).build_all()
        restore_weights(local, model, uri)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return model, tokenizer, cfg, state


def best_checkpoint(cfg: Config) -> str:
    """The checkpoint to use: `cfg.checkpoint` if set, else the best one recorded for run `name`."""
    from capray.config import output_paths

    if cfg.checkpoint:
        return cfg.checkpoint
    uri = output_paths(cfg)["best"]
    if not storage.exists(uri, cfg.storage):
        raise CheckpointError(
            f"no checkpoint given and no trained run at {uri}: set checkpoint=... or run `capray train`"
        )
    return json.loads(storage.read_bytes(uri, cfg.storage))["checkpoint"]
