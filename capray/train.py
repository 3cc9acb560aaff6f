"""Distributed training job: Ray Train TensorflowTrainer + MultiWorkerMirroredStrategy custom loop.

Driver (`train`): fixes the split and tokenizer, builds the Ray datasets that pair every caption
with its image's features, and launches the trainer. Workers (`train_loop_per_worker`): build the
model and Adam inside the strategy scope, run the compiled teacher-forced step with
`strategy.run`, evaluate, and report metrics plus a checkpoint every epoch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import ray
from omegaconf import OmegaConf
import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer

from capray import checkpoint as ckpt
from capray.checkpoint import best_checkpoint  # noqa: F401  (its old home; jobs import it from capray.checkpoint)
from capray import storage
from capray.config import from_yaml, output_paths, to_yaml
from capray.features import FEATURE_SHAPE, caption_dataset, decode_features, feature_stats, read_features
from capray.features import verify as verify_features
from capray.text import Tokenizer

log = logging.getLogger(__name__)


def prepare_tokenizer(cfg: Any, train_captions: list[str]) -> Tokenizer:
    """Fit the tokenizer on the training captions once; later runs reuse the saved one."""
    uri = output_paths(cfg)["tokenizer"]
    if storage.exists(uri, cfg.storage):
        return Tokenizer.from_json(storage.read_bytes(uri, cfg.storage).decode("utf-8"))
    tokenizer = Tokenizer.fit(train_captions, cfg.text.vocab_size, cfg.text.max_length)
    storage.write_bytes(uri, tokenizer.to_json().encode("utf-8"), cfg.storage)
    return tokenizer


def _recorded_best(uri: str, storage_cfg: Any) -> float:
    """val_loss of the best checkpoint recorded so far (inf for a new run)."""
    if not storage.exists(uri, storage_cfg):
        return float("inf")
    return json.loads(storage.read_bytes(uri, storage_cfg))["metrics"]["val_loss"]


class BatchCache:
    """A worker's input rows kept in memory after their first pass, within a shared byte budget.

    Later passes batch (and shuffle) them in memory, so only the first epoch reads the feature
    files through Ray Data. Once the budget is exceeded the cache drops what it holds and the
    worker streams that input every epoch.
    """

    def __init__(self, name: str, budget: list[int]):
        self.name, self.budget = name, budget  # budget: [bytes left], shared by a worker's caches
        self.features: list[np.ndarray] = []
        self.captions: list[np.ndarray] = []
        self.complete = self.overflow = False

    def add(self, features: np.ndarray, captions: np.ndarray) -> None:
        """Keep one batch (features in their stored dtype), unless the budget is spent."""
        if self.overflow or self.complete:
            return
        size = features.nbytes + captions.nbytes
        if size > self.budget[0]:
            self.budget[0] += sum(f.nbytes for f in self.features) + sum(c.nbytes for c in self.captions)
            self.features, self.captions, self.overflow = [], [], True
            return
        self.budget[0] -= size
        self.features.append(features)
        self.captions.append(captions)

    def finish(self) -> None:
        """The first pass is over: from now on `batches` serves it from memory."""
        if not self.overflow and not self.complete and self.features:
            self.features, self.captions = [np.concatenate(self.features)], [np.concatenate(self.captions)]
            self.complete = True

    def batches(self, batch_size: int, seed: int | None, drop_last: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features float32, captions) batches; shuffled with `seed` unless it is None."""
        features, captions = self.features[0], self.captions[0]
        order = np.arange(len(captions)) if seed is None else np.random.default_rng(seed).permutation(len(captions))
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, end, batch_size):
            pick = np.sort(order[i : i + batch_size]) if seed is None else order[i : i + batch_size]
            yield features[pick].astype(np.float32), captions[pick]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: MultiWorkerMirroredStrategy custom loop over this worker's data shard."""
    import tensorflow as tf

    from capray.model import Captioner, attention_penalty, caption_loss, gpu_memory_growth, make_optimizer, set_precision

    gpu_memory_growth()  # before any op: workers sharing a GPU must not each map all of it
    cfg = from_yaml(config["cfg"])
    set_precision(cfg.model.precision)  # before any layer is built
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    mixed = cfg.model.precision == "mixed_float16"
    tokenizer = Tokenizer.from_json(config["tokenizer"])
    # Per-epoch progress bars from every worker would drown the epoch lines printed below.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Train V2 sets the worker's root logger to INFO, and one of its modules logs every report
    # ("Reporting training result ...", twice per epoch) under a logger named by its file path,
    # outside `ray.train`, so those records reach the console through the root logger. Ray
    # Train's own `ray.train` logger does not propagate to the root and is unaffected.
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    global_batch = cfg.train.batch_size
    if global_batch % world:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by ray.num_workers={world}")
    local_batch = global_batch // world
    tf.keras.utils.set_random_seed(cfg.train.shuffle_seed)

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = Captioner(tokenizer.vocab_size, cfg.model.embedding_dim, cfg.model.units).build_all()
        total_steps = cfg.train.epochs * (config["train_captions"] // global_batch)
        optimizer = make_optimizer(cfg.train.learning_rate, cfg.train.lr_schedule, total_steps, mixed, cfg.train.optimizer)
        optimizer.build(model.trainable_variables)
    if config.get("feature_mean") is not None:
        model.set_feature_stats(np.array(config["feature_mean"]), np.array(config["feature_std"]))

    paths = output_paths(cfg)
    storage_cfg = config["storage"]
    best_val = _recorded_best(paths["best"], storage_cfg)
    start_epoch, step, skip_steps = 0, 0, 0
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            ckpt.restore_weights(d, model)
            ckpt.restore_optimizer(d, optimizer)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
        start_epoch, step, skip_steps = state["epoch"], state["step"], state.get("epoch_step", 0)
        if rank == 0:
            print(f"[capray] resuming from epoch {start_epoch} (step {step})", flush=True)

    signature = (
        tf.TensorSpec((local_batch, *FEATURE_SHAPE), tf.float32),
        tf.TensorSpec((local_batch, tokenizer.max_length), tf.int32),
    )

    def forward_backward(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list]:
        with tf.GradientTape() as tape:
            logits, attention = model(features, captions, training=True)
            loss_sum, tokens = caption_loss(captions, logits)
            # Scaled by the global batch: the all-reduced sum of gradients is the global mean.
            loss = loss_sum / global_batch
            if cfg.train.attention_reg:
                loss += cfg.train.attention_reg * attention_penalty(captions, attention) / global_batch
            if mixed:
                # Gradients of loss x dynamic scale (no float16 underflow); the optimizer unscales.
                loss = optimizer.scale_loss(loss)
        return loss_sum, tokens, tape.gradient(loss, model.trainable_variables)

    if cfg.model.jit_compile:
        # XLA compiles each replica's forward/backward pass only; the all-reduce and the update
        # stay with the strategy's collectives.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, tokens, grads = forward_backward(features, captions)
        # Loss scaling (mixed_float16) also takes this path: the loss-scale optimizer skips a step when the
        # gradients are not finite, and every replica must see the same (reduced) gradients to
        # agree on it.
        if cfg.train.clip_norm or mixed:
            # Keras clips each replica's partial gradient before its own all-reduce; the norm
            # that matters is the summed one. Reduce, clip, then divide by the replica count so
            # that the optimizer's all-reduce sums the copies back to the clipped gradient.
            grads = [tf.convert_to_tensor(g) for g in grads]
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            if cfg.train.clip_norm:
                # Scaled gradients (mixed_float16) are clipped at the equally scaled norm.
                scale = optimizer.dynamic_scale if mixed else 1.0
                grads, _ = tf.clip_by_global_norm(grads, cfg.train.clip_norm * scale)
            grads = [g / strategy.num_replicas_in_sync for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, tokens

    @tf.function(input_signature=signature)
    def train_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, tokens = strategy.run(replica_step, args=(features, captions))
        sum_ = tf.distribute.ReduceOp.SUM
        return strategy.reduce(sum_, loss_sum, axis=None), strategy.reduce(sum_, tokens, axis=None)

    @tf.function(reduce_retracing=True)
    def eval_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits, _ = model(features, captions)
        return caption_loss(captions, logits)

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    shuffle = cfg.train.shuffle
    every = cfg.train.checkpoint_every_steps

    # The first pass over each input fills its cache; later passes read memory, not Ray Data.
    budget = [cfg.train.cache_mb << 20]
    train_cache, val_cache = BatchCache("training", budget), BatchCache("validation", budget)

    def input_batches(cache: BatchCache | None, stream: Any, batch_size: int, seed: int | None, **kwargs: Any):
        """(features float32, captions) batches: from the cache once it holds a whole pass, else
        streamed from Ray Data (and kept, on the first pass)."""
        if cache is not None and cache.complete:
            yield from cache.batches(batch_size, seed, drop_last=kwargs.get("drop_last", False))
            return
        for batch in stream(batch_size=batch_size, **kwargs):
            stored = decode_features(batch["features"], batch["dtype"][0], as_stored=True)
            if cache is not None:
                cache.add(stored, batch["captions"])
            yield stored.astype(np.float32), batch["captions"]
        if cache is not None:
            finish(cache)

    def finish(cache: BatchCache) -> None:
        was_complete = cache.complete or cache.overflow
        cache.finish()
        if rank == 0 and cache.overflow and not was_complete:
            print(f"[capray] the {cache.name} input of a worker exceeds train.cache_mb={cfg.train.cache_mb}: "
                  "it is read from the feature files every epoch", flush=True)

    def validate() -> tuple[float, float]:
        val_sum = val_tokens = 0.0
        val_captions = 0
        for feats, caps in input_batches(val_cache, val_data.iter_batches, 128, None):
            ls, nt = eval_step(feats, caps)
            val_sum += float(ls)
            val_tokens += float(nt)
            val_captions += len(caps)
        return val_sum / max(val_tokens, 1.0), val_sum / max(val_captions, 1)

    def report(epochs_done: int, epoch_step: int, train_loss: float, captions_per_s: float, input_wait: float) -> None:
        """Validation loss, `ray.train.report` and a checkpoint (rank 0 writes it, all report)."""
        nonlocal best_val
        val_loss, val_per_caption = validate()
        metrics = {
            "epoch": epochs_done + (epoch_step > 0),
            "step": step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_loss_per_caption": val_per_caption,
            "captions_per_s": captions_per_s,
            # share of the training wall time this worker waited for its next batch
            "input_wait": input_wait,
        }
        # `epoch` counts completed epochs; `epoch_step` > 0 marks a checkpoint taken inside one.
        state = {"epoch": epochs_done, "epoch_step": epoch_step, "step": step, "metrics": metrics}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        where = f"epoch {epochs_done + 1}/{cfg.train.epochs} step {step} (mid-epoch)" if epoch_step else f"epoch {epochs_done}/{cfg.train.epochs} step {step}"
        print(
            f"[capray] {where} train_loss {train_loss:.4f} val_loss {val_loss:.4f} ({captions_per_s:.0f} captions/s, "
            f"{input_wait:.0%} of it waiting for input)",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.write(tmp, model, optimizer, tokenizer, cfg, state)
            if val_loss < best_val:
                best_val = val_loss
                storage.upload_dir(tmp, paths["best_checkpoint"], storage_cfg)
                # Published only once the copy is complete.
                record = {"checkpoint": paths["best_checkpoint"], "metrics": metrics}
                storage.write_bytes(paths["best"], json.dumps(record, indent=2).encode("utf-8"), storage_cfg)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    steps_per_epoch = config["train_captions"] // global_batch
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        loss_sum = tokens = 0.0
        captions_seen = 0
        # A run resumed from a mid-epoch checkpoint runs only the rest of that epoch's steps.
        # Ray Data's block order is not fixed, so those are not exactly the captions the
        # interrupted run would have seen; the step count and optimizer state are.
        epoch_step = skip_steps if epoch == start_epoch else 0
        seed = cfg.train.shuffle_seed + 1000 * epoch + rank if shuffle else None
        # A resumed epoch that skips steps is not a whole pass: it is not cached.
        cache = train_cache if epoch_step == 0 else None
        batches = input_batches(
            cache, train_shard.iter_batches, local_batch, seed,
            drop_last=True,  # every worker must run the same number of all-reduce steps
            **({} if cache and cache.complete else dict(local_shuffle_buffer_size=8 * local_batch if shuffle else None,
                                                        local_shuffle_seed=seed)),
        )
        waited, asked = 0.0, time.perf_counter()
        for feats, caps in batches:
            waited += time.perf_counter() - asked
            if epoch_step >= steps_per_epoch:
                break
            ls, nt = train_step(feats, caps)
            loss_sum += float(ls)
            tokens += float(nt)
            captions_seen += global_batch
            step += 1
            epoch_step += 1
            if every and step % every == 0 and epoch_step < steps_per_epoch:
                report(epoch, epoch_step, loss_sum / max(tokens, 1.0), captions_seen / max(time.time() - t0, 1e-9),
                       waited / max(time.time() - t0, 1e-9))
            asked = time.perf_counter()
        if cache is not None:
            finish(cache)  # also when the loop stopped at steps_per_epoch before the stream ended
        report(epoch + 1, 0, loss_sum / max(tokens, 1.0), captions_seen / max(time.time() - t0, 1e-9),
               waited / max(time.time() - t0, 1e-9))


def train(cfg: Any) -> dict[str, Any]:
    """Train on the extracted features of the split; returns the best checkpoint and its metrics."""
    from capray.data import prepare_split

    train_df, val_df = prepare_split(cfg)
    tokenizer = prepare_tokenizer(cfg, list(train_df["caption"]))
    p = output_paths(cfg)
    if not storage.exists(p["features"], cfg.storage):
        raise FileNotFoundError(f"no features at {p['features']}: run `capray extract` with the same config first")
    verify_features(p["features"], cfg.storage)
    features = read_features(p["features"], cfg.storage)
    train_images, val_images = set(train_df["image"]), set(val_df["image"])
    train_features = features.filter(lambda row: row["image"] in train_images)
    loop_config: dict[str, Any] = {
        "cfg": to_yaml(cfg),
        "tokenizer": tokenizer.to_json(),
        "train_captions": len(train_df),
        # The saved config has no credentials; workers get them in memory only.
        "storage": OmegaConf.create(OmegaConf.to_container(cfg.storage)),
    }
    if cfg.model.feature_norm == "channel":
        mean, std = feature_stats(train_features)
        loop_config.update(feature_mean=mean.tolist(), feature_std=std.tolist())
    datasets = {
        "train": caption_dataset(train_features, train_df, tokenizer),
        "val": caption_dataset(features.filter(lambda row: row["image"] in val_images), val_df, tokenizer),
    }
    fs, runs = storage.filesystem(p["runs"], cfg.storage)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        last = latest_checkpoint(cfg)
        raise TrainingError(
            f"training run '{cfg.name}' failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the last good checkpoint is {last or 'none (no epoch completed)'}: re-run the same command to "
            f"resume from it, or set train.max_failures (now {cfg.train.max_failures}) to restart failed workers"
        ) from e
    summary = json.loads(storage.read_bytes(p["best"], cfg.storage))
    return summary


class TrainingError(RuntimeError):
    """Training stopped for good; the message names the last good checkpoint."""


def latest_checkpoint(cfg: Any) -> str | None:
    """The run's most recent complete epoch checkpoint (by its state.json), or None."""
    run_dir = storage.join(output_paths(cfg)["runs"], cfg.name)
    states = [u for u in storage.list_files(run_dir, cfg.storage, ("state.json",)) if "/checkpoint_" in u]
    epochs = {u.rsplit("/", 1)[0]: json.loads(storage.read_bytes(u, cfg.storage))["epoch"] for u in states}
    for uri in sorted(epochs, key=epochs.get, reverse=True):
        try:
            ckpt.check(uri, cfg.storage)  # a copy cut short by the failure may lack files
        except ckpt.CheckpointError:
            continue
        return uri
    return None


def run(cfg: Any) -> dict[str, Any]:
    """`capray train`: train, print where the best checkpoint is, and evaluate it if `evaluate.after_train`."""
    summary = train(cfg)
    m = summary["metrics"]
    print(f"[capray] train: best checkpoint {summary['checkpoint']} (epoch {m['epoch']}, val_loss {m['val_loss']:.4f})", flush=True)
    if cfg.evaluate.after_train:
        from capray import evaluate

        summary["evaluation"] = evaluate.evaluate(cfg, summary["checkpoint"])
        evaluate.print_table(summary["evaluation"])
    return summary
