"""The training worker: Ray Train runs `train_loop_per_worker` in every worker process.

Each worker builds the model and optimizer inside a MultiWorkerMirroredStrategy scope, resumes
from Ray Train's checkpoint if there is one, and runs the compiled distributed step
(`make_train_step`) over its shard of the training captions. A `Reporter` validates (each worker
its own part of the validation set, capray.train.sharding, summed over the workers) and reports
metrics plus a checkpoint at every epoch end (and every `train.checkpoint_every_steps` steps);
`WorkerInput` streams the shards through Ray Data on the first pass and from memory after.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.train
import tensorflow as tf
from ray.train import Checkpoint

from capray import checkpoint as ckpt
from capray import storage
from capray.config import check_training, from_yaml, output_paths
from capray.featurestore import FEATURE_SHAPE, FeatureError, decode_features

# capray.model first: it imports TensorFlow with its start-up log noise filtered.
from capray.model import (
    ShowAttendTell,
    attention_penalty,
    caption_loss,
    gpu_memory_growth,
    make_optimizer,
    set_precision,
)
from capray.text import Tokenizer
from capray.train.curves import CurveWriter

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)
Batch = tuple[np.ndarray, np.ndarray]  # features (B, 64, 2048) float32, captions (B, T) int32
VAL_BATCH = 128  # validation captions per batch (each worker's own; no collective per batch)


def make_train_step(
    model: tf.keras.Model,
    optimizer: tf.keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    global_batch: int,
    clip_norm: float = 0.0,
    attention_reg: float = 0.0,
    mixed: bool = False,
    jit_compile: bool = False,
    signature: tuple[tf.TensorSpec, tf.TensorSpec] | None = None,
) -> Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor]]:
    """The compiled distributed step: (features, captions) -> (loss summed over tokens, real tokens), all replicas."""

    def forward_backward(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list]:
        with tf.GradientTape() as tape:
            logits, attention = model(features, captions, training=True)  # (B, T-1, V), (B, T-1, 64)
            loss_sum, tokens = caption_loss(captions, logits)
            # Scaled by the global batch: the all-reduced sum of gradients is the global mean.
            loss = loss_sum / global_batch
            if attention_reg:
                loss += attention_reg * attention_penalty(captions, attention) / global_batch
            if mixed:
                # Gradients of loss x dynamic scale (no float16 underflow); the optimizer unscales.
                loss = optimizer.scale_loss(loss)
        return loss_sum, tokens, tape.gradient(loss, model.trainable_variables)

    if jit_compile:
        # XLA compiles each replica's forward/backward pass only; the all-reduce and the update
        # stay with the strategy's collectives.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, tokens, grads = forward_backward(features, captions)
        # Loss scaling (mixed_float16) also takes this path: the loss-scale optimizer skips a step when the
        # gradients are not finite, and every replica must see the same (reduced) gradients to
        # agree on it.
        if clip_norm or mixed:
            # Keras clips each replica's partial gradient before its own all-reduce; the norm
            # that matters is the summed one. Reduce, clip, then divide by the replica count so
            # that the optimizer's all-reduce sums the copies back to the clipped gradient.
            grads = [tf.convert_to_tensor(g) for g in grads]
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            if clip_norm:
                # Scaled gradients (mixed_float16) are clipped at the equally scaled norm.
                scale = optimizer.dynamic_scale if mixed else 1.0
                grads, _ = tf.clip_by_global_norm(grads, clip_norm * scale)
            grads = [g / strategy.num_replicas_in_sync for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, tokens

    @tf.function(input_signature=signature)
    def train_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, tokens = strategy.run(replica_step, args=(features, captions))
        sum_ = tf.distribute.ReduceOp.SUM
        return strategy.reduce(sum_, loss_sum, axis=None), strategy.reduce(sum_, tokens, axis=None)

    return train_step


def make_eval_step(model: tf.keras.Model) -> Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor]]:
    """The compiled validation step: (features, captions) -> (loss summed over tokens, real tokens), this worker."""

    # Validation batches are 128 captions but the last one is shorter: one trace for both.
    @tf.function(reduce_retracing=True)
    def eval_step(features: tf.Tensor, captions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits, _ = model(features, captions)  # (B, T-1, V)
        return caption_loss(captions, logits)

    return eval_step


def make_all_reduce(strategy: tf.distribute.Strategy) -> Callable[[list[float]], np.ndarray]:
    """A few numbers summed over every worker: one collective, outside any step (float64 sums)."""

    def replica_sum(values: tf.Tensor) -> tf.Tensor:
        # tf.identity: on this replica's device (a tensor made outside `run` has none).
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(values))

    @tf.function
    def all_reduce(values: tf.Tensor) -> Any:
        return strategy.run(replica_sum, args=(values,))

    def run(values: list[float]) -> np.ndarray:
        summed = all_reduce(tf.constant(values, tf.float64))
        return strategy.experimental_local_results(summed)[0].numpy()

    return run


def restore(
    checkpoint: Checkpoint | None, model: tf.keras.Model, optimizer: Any, announce: bool = False
) -> tuple[int, int, int]:
    """Load a Ray Train checkpoint into model and optimizer; returns (epoch, step, steps of that epoch done)."""
    if not checkpoint:
        return 0, 0, 0
    with checkpoint.as_directory() as d:
        ckpt.restore_weights(d, model, hint="; use another run name or the training config of that checkpoint")
        ckpt.restore_optimizer(d, optimizer)
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    epoch, step = state["epoch"], state["step"]
    if announce:
        log.info("resuming from epoch %d (step %d)", epoch, step)
    # Checkpoints written before mid-epoch ones existed have no epoch_step: they end an epoch.
    return epoch, step, state.get("epoch_step", 0)


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
            self.give_up()
            return
        self.budget[0] -= size
        self.features.append(features)
        self.captions.append(captions)

    def give_up(self) -> None:
        """This input does not fit (here or on another worker): drop it, and stream it from now on."""
        self.drop()
        self.complete, self.overflow = False, True

    def finish(self) -> None:
        """The first pass is over: from now on `batches` serves it from memory."""
        if not self.overflow and not self.complete:
            # An empty pass is complete too: a validation part may hold no rows.
            if self.features:
                self.features, self.captions = [np.concatenate(self.features)], [np.concatenate(self.captions)]
            self.complete = True

    def drop(self) -> None:
        """Forget what it holds (its bytes go back to the budget); a later pass may keep it again."""
        self.budget[0] += sum(f.nbytes for f in self.features) + sum(c.nbytes for c in self.captions)
        self.features, self.captions, self.complete = [], [], False

    def batches(self, batch_size: int, seed: int | None, drop_last: bool) -> Iterator[Batch]:
        """(features float32, captions) batches; shuffled with `seed` unless it is None."""
        if not self.features:
            return
        features, captions = self.features[0], self.captions[0]
        order = np.arange(len(captions)) if seed is None else np.random.default_rng(seed).permutation(len(captions))
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, end, batch_size):
            pick = np.sort(order[i : i + batch_size]) if seed is None else order[i : i + batch_size]
            yield features[pick].astype(np.float32), captions[pick]


class WorkerInput:
    """A worker's training and validation batches: from Ray Data on the first pass, from its caches after."""

    def __init__(self, train_shard: Any, val_shard: Any, cache_mb: int, announce: bool = False):
        self.train_shard, self.val_shard, self.cache_mb, self.announce = train_shard, val_shard, cache_mb, announce
        budget = [cache_mb << 20]  # bytes left, shared by both caches
        self.train_cache, self.val_cache = BatchCache("training", budget), BatchCache("validation", budget)
        self._pass: BatchCache | None = None
        self._val_held = False

    def training(self, batch_size: int, seed: int | None, shuffle: bool, whole_pass: bool) -> Iterator[Batch]:
        """One epoch's training batches (`end_epoch` after it); a resumed epoch is not a whole pass."""
        # A resumed epoch that skips steps is not a whole pass: it is not cached.
        cache = self._pass = self.train_cache if whole_pass else None
        stream = (
            {}
            if cache and cache.complete
            else dict(local_shuffle_buffer_size=8 * batch_size if shuffle else None, local_shuffle_seed=seed)
        )
        # drop_last: every worker must run the same number of all-reduce steps.
        return self._batches(cache, self.train_shard.iter_batches, batch_size, seed, drop_last=True, **stream)

    def end_epoch(self) -> None:
        """The epoch's steps are done, also when they stopped before the stream ended: its pass is cached."""
        if self._pass is not None:
            self._finish(self._pass)

    def validation(self) -> Iterator[Batch]:
        """This worker's part of the validation set, in a fixed order (`agree` after it)."""
        self._val_held = False
        if self.val_cache.complete:
            yield from self.val_cache.batches(VAL_BATCH, None, drop_last=False)
            return
        for batch in self.val_shard.iter_batches(batch_size=VAL_BATCH):
            stored = decode_features(batch["features"], batch["dtype"][0], as_stored=True)  # (B, 64, 2048)
            self.val_cache.add(stored, batch["captions"])
            yield stored.astype(np.float32), batch["captions"]
        self._val_held = not self.val_cache.overflow

    def cache_state(self) -> list[float]:
        """What the workers agree on (`agree`, after summing over them) before serving input from
        memory: [holds its whole part of the last validation, validation part does not fit,
        training shard does not fit]."""
        held = self.val_cache.complete or self._val_held
        return [float(held), float(self.val_cache.overflow), float(self.train_cache.overflow)]

    def agree(self, summed: Any, workers: int) -> None:
        """Apply `cache_state` summed over every worker: all workers read memory, or all stream.

        A worker that streams a split dataset while another reads memory blocks the split (Ray
        Data starts a pass only once every worker asks for it). For validation there is more:
        `streaming_split(equal=False)` hands each block, as Ray Data produces it, to the worker
        with the fewest rows so far, and blocks come in no fixed order, so a worker's part differs
        from pass to pass and only the parts of one pass together hold every caption once. So the
        parts are kept only once every worker holds its whole part of the same pass: from then on
        no worker reads the stream again and the parts stay that pass's. Training shards are equal,
        but the validation parts are not, and they share the byte budget.
        """
        held, val_overflow, train_overflow = summed
        if train_overflow and not self.train_cache.overflow:
            self.train_cache.give_up()
            self._announce_overflow(self.train_cache, "every epoch")
        if self.val_cache.complete:
            return
        if held == workers:
            self.val_cache.finish()
            return
        self.val_cache.drop()
        # A part that did not fit once will not fit later: every validation streams.
        if val_overflow and not self.val_cache.overflow:
            self.val_cache.give_up()
            self._announce_overflow(self.val_cache, "at every validation")

    def _announce_overflow(self, cache: BatchCache, when: str) -> None:
        if self.announce:
            log.warning(
                "the %s input of a worker exceeds train.cache_mb=%d: it is read from the feature files %s",
                cache.name,
                self.cache_mb,
                when,
            )

    def _batches(
        self, cache: BatchCache | None, stream: Any, batch_size: int, seed: int | None, **kwargs: Any
    ) -> Iterator[Batch]:
        if cache is not None and cache.complete:
            yield from cache.batches(batch_size, seed, drop_last=kwargs.get("drop_last", False))
            return
        for batch in stream(batch_size=batch_size, **kwargs):
            stored = decode_features(batch["features"], batch["dtype"][0], as_stored=True)  # (B, 64, 2048)
            if cache is not None:
                cache.add(stored, batch["captions"])
            yield stored.astype(np.float32), batch["captions"]
        if cache is not None:
            self._finish(cache)

    def _finish(self, cache: BatchCache) -> None:
        was_complete = cache.complete or cache.overflow
        cache.finish()
        if cache.overflow and not was_complete:
            self._announce_overflow(cache, "every epoch")


class EpochMeter:
    """An epoch's running training loss, throughput and share of time spent waiting for input."""

    def __init__(self, global_batch: int):
        self.global_batch, self.start = global_batch, time.time()
        self.loss_sum = self.tokens = self.waited = 0.0
        self.captions = 0
        self.asked = time.perf_counter()

    def got_batch(self) -> None:
        """The next batch arrived: the time since `asking` was spent waiting for input."""
        self.waited += time.perf_counter() - self.asked

    def add(self, loss_sum: tf.Tensor, tokens: tf.Tensor) -> None:
        """Count one global step's summed loss and real tokens."""
        self.loss_sum += float(loss_sum)
        self.tokens += float(tokens)
        self.captions += self.global_batch

    def asking(self) -> None:
        """The worker asks for its next batch now."""
        self.asked = time.perf_counter()

    def summary(self) -> tuple[float, float, float]:
        """(training loss per token, captions/s, share of the wall time waiting for input), so far."""
        elapsed = max(time.time() - self.start, 1e-9)
        return self.loss_sum / max(self.tokens, 1.0), self.captions / elapsed, self.waited / elapsed


def _recorded_best(uri: str, storage_cfg: Any) -> float:
    """val_loss of the best checkpoint recorded so far (inf for a new run)."""
    if not storage.exists(uri, storage_cfg):
        return float("inf")
    return json.loads(storage.read_bytes(uri, storage_cfg))["metrics"]["val_loss"]


class Reporter:
    """Validates, then reports metrics and a checkpoint to Ray Train; rank 0 writes it and keeps the best."""

    def __init__(
        self,
        cfg: Config,
        storage_cfg: Any,
        model: tf.keras.Model,
        optimizer: Any,
        tokenizer: Tokenizer,
        inputs: WorkerInput,
        rank: int,
        strategy: tf.distribute.Strategy,
        val_captions: int,
    ):
        self.cfg, self.storage_cfg, self.model, self.optimizer, self.tokenizer = (
            cfg,
            storage_cfg,
            model,
            optimizer,
            tokenizer,
        )
        self.inputs, self.rank, self.val_captions = inputs, rank, val_captions
        self.warned: set[str] = set()  # each shortfall once per worker, not at every epoch
        self.eval_step = make_eval_step(model)
        self.all_reduce, self.replicas = make_all_reduce(strategy), strategy.num_replicas_in_sync
        self.paths = output_paths(cfg)
        # A resumed run keeps its best: a worse epoch after the restart does not replace it.
        self.best_val = _recorded_best(self.paths["best"], storage_cfg)
        self.curves = CurveWriter(self.paths["tensorboard"], storage_cfg) if rank == 0 else None

    def validate(self) -> tuple[float, float]:
        """The validation loss per token and per caption over every worker's part: the same on every worker."""
        loss_sum = tokens = captions = 0.0
        for feats, caps in self.inputs.validation():
            ls, nt = self.eval_step(feats, caps)
            loss_sum += float(ls)
            tokens += float(nt)
            captions += len(caps)
        # One all-reduce per validation, after this worker's last batch: the parts differ in size
        # (streaming_split equal=False), so the workers run different numbers of batches and a
        # collective per batch would wait forever on the worker that has finished.
        # The same collective carries what the input caches need every worker to agree on.
        summed = self.all_reduce([loss_sum, tokens, captions, *self.inputs.cache_state()])
        self.inputs.agree(summed[3:], self.replicas)
        loss_sum, tokens, captions = summed[:3]
        self.shortfall("val", int(captions), self.val_captions, self.val_captions)
        return loss_sum / max(tokens, 1.0), loss_sum / max(captions, 1.0)

    def shortfall(self, side: str, got: int, expected: int, split_captions: int, batch: int = 0) -> None:
        """`coverage`'s check: raises on every worker alike (each has the same counts: summed, or
        equal training shards); rank 0 warns, once per side."""
        warning = coverage(side, got, expected, split_captions, self.paths["features"], batch)
        if warning and self.rank == 0 and side not in self.warned:
            self.warned.add(side)
            log.warning(warning)

    def report(
        self, epochs_done: int, epoch_step: int, step: int, train_loss: float, captions_per_s: float, input_wait: float
    ) -> None:
        """Validation loss, `ray.train.report` and a checkpoint (rank 0 writes it, all report)."""
        val_loss, val_per_caption = self.validate()
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
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        epochs = self.cfg.train.epochs
        where = (
            f"epoch {epochs_done + 1}/{epochs} step {step} (mid-epoch)"
            if epoch_step
            else f"epoch {epochs_done}/{epochs} step {step}"
        )
        log.info(
            f"{where} train_loss {train_loss:.4f} val_loss {val_loss:.4f} ({captions_per_s:.0f} captions/s, "
            f"{input_wait:.0%} of it waiting for input)"
        )
        assert self.curves is not None  # rank 0 reports; the others returned above
        self.curves.add(step, {**metrics, "learning_rate": _learning_rate(self.optimizer)})
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.write(tmp, self.model, self.optimizer, self.tokenizer, self.cfg, state)
            if val_loss < self.best_val:
                self.best_val = val_loss
                self._keep_best(tmp, metrics)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def close(self) -> None:
        """Rank 0 closes its curves (on object storage, their local copy is removed)."""
        if self.curves is not None:
            self.curves.close()

    def _keep_best(self, directory: str, metrics: dict) -> None:
        storage.upload_dir(directory, self.paths["best_checkpoint"], self.storage_cfg)
        # Published only once the copy is complete.
        record = {"checkpoint": self.paths["best_checkpoint"], "metrics": metrics}
        storage.write_bytes(self.paths["best"], json.dumps(record, indent=2).encode("utf-8"), self.storage_cfg)


def coverage(side: str, got: int, expected: int, split_captions: int, features: str, batch: int = 0) -> str | None:
    """What a worker says when fewer of the split's captions on one side reached it than the
    split holds: the captions of images without features (never extracted, or failed) never do.

    `got` and `expected` count training steps of `batch` captions (this pass) or validation
    captions. None when nothing is missing; a warning's text when some are; a FeatureError when
    none are left to train or validate on (it used to run 0 steps and keep a val_loss of 0.0)."""
    if got >= expected:
        return None
    hint = f"the others' images have no features in {features} (not extracted, or failed: `capray status {features}`)"
    if side == "val":
        if got == 0:
            raise FeatureError(
                f"none of the split's {split_captions} validation captions has an image with features in "
                f"{features}: were the features extracted from the split's images (`capray extract` with this config)?"
            )
        return (
            f"validation: {got} of the split's {split_captions} validation captions have an image with features; {hint}"
        )
    if got == 0:
        raise FeatureError(
            f"no training step: fewer than train.batch_size={batch} of the split's {split_captions} training captions "
            f"have an image with features in {features}: were the features extracted from the split's images "
            "(`capray extract` with this config)?"
        )
    return (
        f"training: the pass ended after {got} of its {expected} steps of {batch} captions, so about {got * batch} of "
        f"the split's {split_captions} training captions have an image with features; {hint}"
    )


def _learning_rate(optimizer: Any) -> float:
    """The rate of the optimizer's next step (schedules included; a loss-scale wrapper's inner one)."""
    rate = getattr(optimizer, "inner_optimizer", optimizer).learning_rate
    # A fixed rate is a variable, mirrored under the strategy (float() cannot read that one).
    return float(tf.convert_to_tensor(rate))


def _quiet_worker() -> None:
    # Per-epoch progress bars from every worker would drown the epoch lines of the Reporter.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Train V2 sets the worker's root logger to INFO, and one of its modules logs every report
    # ("Reporting training result ...", twice per epoch) under a logger named by its file path,
    # outside `ray.train`, so those records reach the console through the root logger. The
    # `ray.train` logger has its own handler (it does not propagate to the root) and logs each
    # persisted checkpoint ("Checkpoint successfully created at ..."): the Reporter's epoch
    # lines already say both. Warnings and errors of either still show.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: MultiWorkerMirroredStrategy custom loop over this worker's data shard."""
    gpu_memory_growth()  # before any op: workers sharing a GPU must not each map all of it
    cfg, tokenizer = from_yaml(config["cfg"]), Tokenizer.from_json(config["tokenizer"])
    set_precision(cfg.model.precision)  # before any layer is built
    mixed = cfg.model.precision == "mixed_float16"  # float16 gradients underflow without loss scaling
    _quiet_worker()
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    global_batch, every = cfg.train.batch_size, cfg.train.checkpoint_every_steps
    check_training(cfg)  # the driver checked it too; a caller of build_trainer may not have
    local_batch, steps_per_epoch = global_batch // world, config["train_captions"] // global_batch
    tf.keras.utils.set_random_seed(cfg.train.shuffle_seed)

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = ShowAttendTell(tokenizer.vocab_size, cfg.model.embedding_dim, cfg.model.units).build_all()
        optimizer = make_optimizer(
            cfg.train.learning_rate,
            cfg.train.lr_schedule,
            cfg.train.epochs * steps_per_epoch,
            mixed,
            cfg.train.optimizer,
        )
        optimizer.build(model.trainable_variables)
    if config.get("feature_mean") is not None:
        model.set_feature_stats(np.array(config["feature_mean"]), np.array(config["feature_std"]))
    start_epoch, step, skip_steps = restore(ray.train.get_checkpoint(), model, optimizer, announce=rank == 0)
    signature = (
        tf.TensorSpec((local_batch, *FEATURE_SHAPE), tf.float32),
        tf.TensorSpec((local_batch, tokenizer.max_length), tf.int32),
    )
    train_step = make_train_step(
        model,
        optimizer,
        strategy,
        global_batch,
        cfg.train.clip_norm,
        cfg.train.attention_reg,
        mixed,
        cfg.model.jit_compile,
        signature,
    )
    inputs = WorkerInput(
        ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"), cfg.train.cache_mb, announce=rank == 0
    )
    reporter = Reporter(
        cfg, config["storage"], model, optimizer, tokenizer, inputs, rank, strategy, config["val_captions"]
    )

    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            # A run resumed from a mid-epoch checkpoint runs only the rest of that epoch's steps.
            # Ray Data's block order is not fixed, so those are not exactly the captions the
            # interrupted run would have seen; the step count and optimizer state are.
            epoch_step = skip_steps if epoch == start_epoch else 0
            seed = cfg.train.shuffle_seed + 1000 * epoch + rank if cfg.train.shuffle else None
            meter, first_step = EpochMeter(global_batch), epoch_step
            for feats, caps in inputs.training(local_batch, seed, cfg.train.shuffle, whole_pass=epoch_step == 0):
                meter.got_batch()
                if epoch_step >= steps_per_epoch:
                    break
                meter.add(*train_step(feats, caps))
                step, epoch_step = step + 1, epoch_step + 1
                if every and step % every == 0 and epoch_step < steps_per_epoch:
                    reporter.report(epoch, epoch_step, step, *meter.summary())
                meter.asking()
            else:  # the input ended before the epoch's steps: captions whose image has no features
                ran, expected = epoch_step - first_step, steps_per_epoch - first_step
                reporter.shortfall("train", ran, expected, config["train_captions"], global_batch)
            inputs.end_epoch()
            reporter.report(epoch + 1, 0, step, *meter.summary())
    finally:
        reporter.close()
