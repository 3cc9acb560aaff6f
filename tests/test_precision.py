"""Mixed precision (`model.precision`) and XLA (`model.jit_compile`) on CPU: mixed_float16 and
XLA are GPU options that must at least build, train and decode correctly here; mixed_bfloat16 is
this CPU's fast path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from builders import REPO, feature_overrides, upload_features
from emulators import Emulator

from capray import extraction, storage, synthetic, train
from capray.captioning import caption
from capray.config import load_config, output_paths
from capray.extraction import FeatureExtractor
from capray.featurestore import decode_features
from capray.model import Backbone, ShowAttendTell, make_optimizer, set_precision
from capray.text import Tokenizer
from capray.train.loop import make_train_step


def _global_policy(name: str) -> Iterator[None]:
    """The global Keras policy set to `name` for one test, float32 again afterwards."""
    set_precision(name)
    try:
        yield
    finally:
        set_precision("float32")
    assert keras.mixed_precision.dtype_policy().name == "float32"


@pytest.fixture
def mixed_policy() -> Iterator[None]:
    """mixed_float16 for one test."""
    yield from _global_policy("mixed_float16")


@pytest.fixture
def bf16_policy() -> Iterator[None]:
    """mixed_bfloat16 for one test."""
    yield from _global_policy("mixed_bfloat16")


def test_model_builds_and_trains_under_mixed_float16_with_xla(mixed_policy) -> None:
    model = ShowAttendTell(12, embedding_dim=16, units=32).build_all()
    # float16 compute, float32 weights.
    assert model.fc2.compute_dtype == "float16" and model.fc2.kernel.dtype == "float32"
    optimizer = make_optimizer(1e-2, loss_scale=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    feats = tf.constant(rng.normal(size=(4, 64, 2048)), tf.float32)
    caps = tf.constant(np.c_[np.full(4, 2), rng.integers(4, 12, (4, 5)), np.full(4, 3)], tf.int32)

    # Production's step with loss scaling and XLA, as a training worker builds it (one replica).
    step = make_train_step(model, optimizer, tf.distribute.get_strategy(), 4, mixed=True, jit_compile=True)
    losses = []
    for _ in range(5):
        loss_sum, tokens = step(feats, caps)
        losses.append(float(loss_sum) / float(tokens))
    logits, attention = model(feats, caps, training=True)
    # Logits and attention stay float32 (softmax and loss in float32).
    assert logits.dtype == tf.float32 and attention.dtype == tf.float32
    assert np.allclose(attention.numpy().sum(-1), 1.0, atol=1e-3)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(optimizer.dynamic_scale) > 1.0
    tokens, _alphas, log_prob, lengths = model.greedy(feats, 6, start_id=Tokenizer.start_id, end_id=Tokenizer.end_id)
    assert tokens.shape == (4, 6) and log_prob.dtype == tf.float32 and (lengths.numpy() >= 1).all()


def test_extraction_actor_under_mixed_float16_matches_float32(mixed_policy) -> None:
    # The extraction job's actor, called as Ray Data calls it (its job is tests/test_extract.py's).
    pixels = np.stack([np.asarray(synthetic.render(seed=5, index=i)[0]) for i in range(4)])
    batch = {"image": np.array([f"{i}.jpg" for i in range(4)]), "pixels": pixels, "error": np.array([None] * 4)}
    table = FeatureExtractor("random", 0, None, "float16", precision="mixed_float16", jit_compile=False)(batch)
    assert keras.mixed_precision.dtype_policy().name == "mixed_float16"
    mixed = decode_features(table["features"].to_pylist(), "float16")
    set_precision("float32")
    exact = Backbone("random", seed=0)(pixels)
    # float16 compute through 94 conv layers: close to float32, not equal.
    assert np.abs(mixed - exact).mean() < 0.01 * np.abs(exact).mean()
    assert not np.array_equal(mixed, exact.astype(np.float16).astype(np.float32))


def _work_on(server: Emulator, synthetic_features: Path) -> list[str]:
    """Overrides of a new work dir on `server`'s store (gs:// or az://) holding a copy of the
    session's float32-extracted features: split, tokenizer, checkpoints, TensorBoard curves and
    captions are written there by the jobs (issue 28's two-worker training on each store)."""
    work = f"{server.bucket('precision')}/work"
    overrides = [*server.settings, *feature_overrides(synthetic_features, work)]
    cfg = load_config(REPO / "configs/demo.yaml", overrides)
    upload_features(synthetic_features, output_paths(cfg)["features"], cfg.storage)
    return overrides


def _train_and_caption(cfg, images: str) -> None:
    """Two training workers for an epoch on the store, then the caption job from its checkpoint
    into the store: finite losses and captions, each with its log-probability."""
    summary = train.train(cfg)
    assert np.isfinite(summary["metrics"]["val_loss"]) and summary["metrics"]["epoch"] == 1
    p = output_paths(cfg)
    assert summary["checkpoint"] == p["best_checkpoint"] and storage.exists(
        f"{p['best_checkpoint']}/model.weights.h5", cfg.storage
    )
    out = f"{cfg.work_dir}/captions"
    s = caption(cfg, summary["checkpoint"], images, out)
    assert s["captioned"] == s["written"] > 0 and s["failed"] == 0  # the first shard (inputs.limit_shards=1)
    fs, path = storage.filesystem(out, cfg.storage)
    rows = pq.ParquetDataset(path, filesystem=fs).read().to_pandas()
    assert len(rows) == s["written"] and rows["caption"].notna().all() and np.isfinite(rows["log_prob"]).all()
    assert keras.mixed_precision.dtype_policy().name == "float32"  # the driver's policy is untouched


def test_jobs_run_with_mixed_precision_and_xla(ray_local, gcs: Emulator, synthetic_features: Path) -> None:
    # A Ray Train epoch (MultiWorkerMirroredStrategy, loss scaling, clipping, XLA forward/backward)
    # on 2 workers and the caption job (XLA InceptionV3) with both on, work_dir on gs://. XLA
    # compiles InceptionV3 once per batch shape, slowly on CPU: one shape, 8 images.
    base = [
        *_work_on(gcs, synthetic_features),
        "data.num_examples=32",
        "model.precision=mixed_float16",
        "model.jit_compile=true",
        "train.epochs=1",
        "train.batch_size=8",
        "train.clip_norm=5.0",
        "ray.num_workers=2",
        "ray.cpus_per_worker=0.5",
        "name=mixed",
        "caption.batch_size=8",
        "inputs.shard_rows=8",
        "inputs.limit_shards=1",
    ]
    _train_and_caption(load_config(REPO / "configs/demo.yaml", base), str(synthetic_features / "data" / "images"))


def test_model_trains_under_mixed_bfloat16_without_loss_scaling(bf16_policy) -> None:
    model = ShowAttendTell(12, embedding_dim=16, units=32).build_all()
    assert model.fc2.compute_dtype == "bfloat16" and model.fc2.kernel.dtype == "float32"
    optimizer = make_optimizer(1e-2)  # bfloat16 keeps float32's exponent range: no loss scale
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    feats = tf.constant(rng.normal(size=(4, 64, 2048)), tf.float32)
    caps = tf.constant(np.c_[np.full(4, 2), rng.integers(4, 12, (4, 5)), np.full(4, 3)], tf.int32)

    step = make_train_step(model, optimizer, tf.distribute.get_strategy(), 4)
    losses = []
    for _ in range(8):
        loss_sum, tokens = step(feats, caps)
        losses.append(float(loss_sum) / float(tokens))
    logits, attention = model(feats, caps, training=True)
    assert logits.dtype == tf.float32 and attention.dtype == tf.float32
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_extraction_actor_under_mixed_bfloat16_is_near_float32(bf16_policy) -> None:
    pixels = np.stack([np.asarray(synthetic.render(seed=5, index=i)[0]) for i in range(4)])
    batch = {"image": np.array([f"{i}.jpg" for i in range(4)]), "pixels": pixels, "error": np.array([None] * 4)}
    table = FeatureExtractor("random", 0, None, "float32", precision="mixed_bfloat16", jit_compile=False)(batch)
    assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
    bf16 = decode_features(table["features"].to_pylist(), "float32")
    set_precision("float32")
    exact = Backbone("random", seed=0)(pixels)
    # 8-bit mantissas through 94 conv layers: a few percent of the mean magnitude, no more.
    rel = np.abs(bf16 - exact).mean() / np.abs(exact).mean()
    assert 0 < rel < 0.05, rel


def test_jobs_extract_train_and_caption_under_mixed_bfloat16(
    ray_local, azure: Emulator, synthetic_features: Path, tmp_path: Path
) -> None:
    images = str(synthetic_features / "data" / "images")
    # Extraction: into a local folder of its own, so that the shared float32 features stay as they are.
    cfg = load_config(
        REPO / "configs/demo.yaml",
        [
            "model.precision=mixed_bfloat16",
            f"extract.input={images}",
            f"work_dir={tmp_path / 'bf16-extract'}",
            "inputs.shard_rows=8",
            "inputs.limit_shards=1",
        ],
    )
    extracted = extraction.run(cfg)
    assert extracted["written"] > 0 and extracted["failed"] == 0
    stored = pd.read_parquet(tmp_path / "bf16-extract" / "features")
    assert len(stored) == extracted["written"] and stored["error"].isna().all()
    # Training on 2 workers and captioning, work_dir on az://.
    base = [
        *_work_on(azure, synthetic_features),
        "data.num_examples=32",
        "model.precision=mixed_bfloat16",
        "train.epochs=1",
        "train.batch_size=8",
        "train.clip_norm=5.0",
        "ray.num_workers=2",
        "ray.cpus_per_worker=0.5",
        "name=bf16",
        "caption.batch_size=8",
        "inputs.shard_rows=8",
        "inputs.limit_shards=1",
    ]
    _train_and_caption(load_config(REPO / "configs/demo.yaml", base), images)


def test_precision_config_names_the_new_key_and_decides_auto() -> None:
    from capray.config import ConfigError, cpu_bf16

    with pytest.raises(ConfigError, match="model.mixed_precision was replaced by model.precision"):
        load_config(None, ["model.mixed_precision=true"])
    with pytest.raises(ConfigError, match="model.precision='half'"):
        load_config(None, ["model.precision=half"])
    assert load_config(None, ["model.precision=auto", "extract.num_gpus=1"]).model.precision == "mixed_float16"
    auto = load_config(None, ["model.precision=auto"]).model.precision
    assert auto == ("mixed_bfloat16" if cpu_bf16() else "float32")


def test_ray_workers_take_gpu_memory_on_demand(ray_local) -> None:
    # What can be checked without a GPU: every Ray worker capray starts has TensorFlow's
    # allow-growth switch, and the in-process call runs before any op and finds no GPU here.
    # That two actors then fit on one GPU (extract.num_gpus=0.5) needs a real GPU; the
    # scheduling half is tests/test_jobs.py (two actors on a head that declares one GPU).
    import ray

    from capray.model import gpu_memory_growth

    @ray.remote
    def worker_side() -> tuple[str | None, int]:
        import os

        from capray.model import gpu_memory_growth

        return os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"), gpu_memory_growth()

    assert ray.get(worker_side.remote()) == ("true", 0)
    assert gpu_memory_growth() == len(tf.config.list_physical_devices("GPU")) == 0
