"""System tests: distributed training on local Ray, 1 vs 2 workers, validation split across workers,
feature statistics taken once per features folder and split.

Two workers with checkpoints on S3 are tests/system/test_train_on_s3.py's (the `jobs_on_s3` run),
on GCS and Azure tests/test_precision.py's; the long kill-and-resume run is in
tests/system/test_train_resume.py (`make test-system`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from builders import checkpoint_states, feature_overrides, reuse_features

from capray import checkpoint, train
from capray.config import from_yaml, load_config
from capray.data import split_rows
from capray.featurestore import FILE_LIST, decode_features

REPO = Path(__file__).resolve().parents[1]
SGD_RATE = 0.1


def test_two_workers_take_exactly_the_sgd_steps_of_one(ray_local, synthetic_features: Path, tmp_path: Path) -> None:
    # 16 training captions and a global batch of 16: every epoch is one full-batch step, whatever
    # Ray Data gives each worker, so 1 and 2 workers must follow the same trajectory. Plain SGD
    # moves by the gradient itself (Adam divides its scale away): a loss divided by the local
    # instead of the global batch doubles every step on 2 workers and fails here.
    work = tmp_path / "work"
    # 20 of the shared scenes (one caption each): 4 for validation, 16 for training.
    common = [
        *reuse_features(synthetic_features, work),
        "data.num_examples=20",
        "model.embedding_dim=16",
        "model.units=32",
        "train.batch_size=16",
        "train.epochs=2",
        "train.optimizer=sgd",
        f"train.learning_rate={SGD_RATE}",
        "train.shuffle=false",
        "train.num_to_keep=0",
        "ray.cpus_per_worker=0.5",
    ]
    curves = {}
    for n in (1, 2):
        cfg = load_config(REPO / "configs/demo.yaml", [*common, f"ray.num_workers={n}", f"name=w{n}"])
        train.train(cfg)
        states = checkpoint_states(str(work / "runs" / f"w{n}"))
        assert [s["step"] for s in states] == [1, 2]  # one full-batch step per epoch
        curves[n] = [(s["metrics"]["train_loss"], s["metrics"]["val_loss"]) for s in states]
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)
    # The steps are large enough for a doubled one to show: the loss moved well past the tolerance.
    (before, first_val), (after_one_step, second_val) = curves[1]
    assert after_one_step < 0.97 * before and second_val < 0.97 * first_val, curves[1]


def _row_keys(features: np.ndarray, captions: np.ndarray) -> list[str]:
    """One key per validation row: its features (as the model gets them) and caption ids. The rows
    carry no image name; an image's captions differ, and equal rows would be equal keys on both
    sides of the comparison (it counts keys)."""
    return [hashlib.sha1(f.tobytes() + c.tobytes()).hexdigest() for f, c in zip(features, captions)]


def _validate_checkpoint(config: dict) -> None:
    """A Ray Train worker that validates `config["checkpoint"]` twice with capray's own Reporter and
    WorkerInput (the second time from the workers' caches) and writes each validation's loss and
    row keys to `config["record"]`."""
    import ray.train
    import tensorflow as tf

    from capray.text import Tokenizer
    from capray.train import loop

    cfg, tokenizer = from_yaml(config["cfg"]), Tokenizer.from_json(config["tokenizer"])
    rank = ray.train.get_context().get_world_rank()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    model = checkpoint.load(config["checkpoint"])[0]
    passes: list[list[str]] = []

    class RecordingInput(loop.WorkerInput):
        def validation(self):  # the rows Reporter.validate consumes, as they pass
            for features, captions in super().validation():
                passes[-1].extend(_row_keys(features, captions))
                yield features, captions

    inputs = RecordingInput(None, ray.train.get_dataset_shard("val"), cfg.train.cache_mb)
    reporter = loop.Reporter(
        cfg, config["storage"], model, None, tokenizer, inputs, rank, strategy, config["val_captions"]
    )
    losses, cached = [], []
    for _ in range(2):
        passes.append([])
        losses.append(reporter.validate()[0])
        cached.append(inputs.val_cache.complete)
    record = {"val_loss": losses, "keys": passes, "cached": cached}
    Path(config["record"], f"{rank}.json").write_text(json.dumps(record))


def test_two_workers_validate_disjoint_parts_to_the_loss_of_one(
    ray_local, synthetic_features: Path, tmp_path: Path
) -> None:
    import ray.cloudpickle

    from capray.model import ShowAttendTell, make_optimizer
    from capray.train import job
    from capray.train.loop import make_eval_step

    # Half the 96 shared scenes validate: parts of tens of captions each.
    cfg = load_config(
        REPO / "configs/demo.yaml",
        [
            *reuse_features(synthetic_features, tmp_path / "work"),
            "data.val_fraction=0.5",
            "model.embedding_dim=16",
            "model.units=32",
            "ray.num_workers=2",
            "ray.cpus_per_worker=0.5",
            "name=val",
        ],
    )
    # The datasets and loop config as capray.train.job.train builds them.
    split = job.prepare_split(cfg)
    tokenizer = job.prepare_tokenizer(cfg, split)
    data, loop_config = job.build_datasets(cfg, job.checked_features(cfg), split, tokenizer)
    # The shared features are one file, so validation is one block, which a split cannot divide;
    # a real work dir has a file per shard. Four blocks here, so that each worker gets some.
    data["val"] = data["val"].repartition(4)
    model = ShowAttendTell(tokenizer.vocab_size, 16, 32).build_all()
    model.set_feature_stats(np.array(loop_config["feature_mean"]), np.array(loop_config["feature_std"]))
    optimizer = make_optimizer(1e-3)
    optimizer.build(model.trainable_variables)
    ckpt = str(tmp_path / "checkpoint")
    checkpoint.write(ckpt, model, optimizer, tokenizer, cfg, {"epoch": 1, "step": 1})

    # One worker: the whole validation set, from the same checkpoint, in this process.
    model = checkpoint.load(ckpt)[0]
    eval_step, loss_sum, tokens, every_row = make_eval_step(model), 0.0, 0.0, []
    for batch in data["val"].iter_batches(batch_size=128):
        features = decode_features(batch["features"], batch["dtype"][0])
        ls, nt = eval_step(features, batch["captions"])
        loss_sum, tokens = loss_sum + float(ls), tokens + float(nt)
        every_row += _row_keys(features, batch["captions"])
    one_worker = loss_sum / tokens
    assert len(every_row) == split_rows(split, cfg.storage, "val") > 40

    # Two Ray Train workers on capray's own data config (build_trainer), validating the checkpoint.
    record = tmp_path / "record"
    record.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker function lives here
    config = {**loop_config, "checkpoint": ckpt, "record": str(record)}
    job.build_trainer(cfg, data, config, loop=_validate_checkpoint).fit()
    workers = [json.loads((record / f"{rank}.json").read_text()) for rank in (0, 1)]
    for i in range(2):  # the first validation streams and fills the cache, the second reads it
        parts = [w["keys"][i] for w in workers]
        # Every validation caption exactly once over the two parts, and each worker its own part.
        assert Counter(parts[0]) + Counter(parts[1]) == Counter(every_row), [len(p) for p in parts]
        assert not set(parts[0]) & set(parts[1]) and all(parts), [len(p) for p in parts]
        for w in workers:
            np.testing.assert_allclose(w["val_loss"][i], one_worker, rtol=1e-5)
    assert [w["cached"] for w in workers] == [[True, True]] * 2


def _training_image_stats(features_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the split's training images, each once, read with pyarrow."""
    train_images = set(pq.read_table(split, filters=[("split", "==", "train")])["image"].to_pylist())
    table = pq.read_table(features_dir).filter(pc.field("error").is_null())
    rows = [b for image, b in zip(table["image"].to_pylist(), table["features"].to_pylist()) if image in train_images]
    assert len(rows) == len(train_images) > 10
    x = decode_features(rows, table["dtype"][0].as_py()).reshape(-1, 2048).astype(np.float64)
    return x.mean(0), x.std(0)


def test_feature_statistics_are_taken_once_per_features_and_split(
    ray_local, synthetic_features: Path, tmp_path: Path
) -> None:
    from capray.train import job

    # The shared features, with a file list of this test's own to rewrite as an extraction would.
    work = tmp_path / "work"
    (work / "features").mkdir(parents=True)
    for f in (synthetic_features / "features").iterdir():
        if f.name == FILE_LIST:
            shutil.copy(f, work / "features" / f.name)
        else:
            (work / "features" / f.name).symlink_to(f)
    base = [*feature_overrides(synthetic_features, work), "model.feature_norm=channel"]
    cfg = load_config(REPO / "configs/demo.yaml", [*base, "name=first"])
    split = job.prepare_split(cfg)
    features = job.checked_features(cfg)
    mean, std = job.prepare_feature_stats(cfg, features, split)
    expected = _training_image_stats(work / "features", split)
    np.testing.assert_allclose(mean, expected[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(std, expected[1], rtol=1e-4, atol=1e-7)

    # Another run on the same features and split (or a resumed one) makes no pass: given a subset
    # of the images, it still returns the statistics of all of them.
    other = load_config(REPO / "configs/demo.yaml", [*base, "name=second"])
    subset = features.limit(40)  # of the 96 scenes
    again = job.prepare_feature_stats(other, subset, split)
    np.testing.assert_array_equal(again[0], mean)
    np.testing.assert_array_equal(again[1], std)

    # Any extraction rewrites the file list (same contents here): the statistics are taken again.
    file_list = work / "features" / FILE_LIST
    file_list.write_bytes(file_list.read_bytes())
    os.utime(file_list, ns=(file_list.stat().st_atime_ns, file_list.stat().st_mtime_ns + 10**9))
    of_subset = job.prepare_feature_stats(other, subset, split)
    assert not np.allclose(of_subset[0], mean, rtol=1e-3)

    # So does a new split: its training images' own statistics, all of them.
    Path(split).unlink()
    halved = load_config(REPO / "configs/demo.yaml", [*base, "name=second", "data.val_fraction=0.5"])
    split = job.prepare_split(halved)
    mean, std = job.prepare_feature_stats(halved, features, split)
    expected = _training_image_stats(work / "features", split)
    np.testing.assert_allclose(mean, expected[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(std, expected[1], rtol=1e-4, atol=1e-7)

    # Features without a file list (an extraction killed before its end) are never reused.
    file_list.unlink()
    assert not np.allclose(job.prepare_feature_stats(halved, subset, split)[0], mean, rtol=1e-3)


def test_a_split_whose_images_lack_features_is_refused_by_the_side_it_leaves_empty(
    ray_local, synthetic_features: Path, tmp_path: Path
) -> None:
    # Training ran 0 steps on captions whose images had no features and kept a "best" checkpoint
    # of val_loss 0.0 (model.feature_norm=none), or failed in its workers on a shape error
    # (channel); with some of them missing it said nothing. A split too small for one batch ran
    # 0 steps too.
    import pandas as pd
    import pytest

    from capray.data import DataError, load_split, save_split
    from capray.featurestore import FeatureError
    from capray.train import job, loop

    work = reuse_features(synthetic_features, tmp_path / "work")
    tiny = ["model.embedding_dim=16", "model.units=32", "model.feature_norm=none", "train.epochs=1"]
    cfg = load_config(REPO / "configs/demo.yaml", [*work, *tiny, "train.batch_size=8", "ray.num_workers=1"])
    split = job.prepare_split(cfg)
    train_rows, val_rows = load_split(split)
    too_big = load_config(REPO / "configs/demo.yaml", [*work, *tiny, f"train.batch_size={len(train_rows) + 2}"])
    with pytest.raises(DataError, match=f"{len(train_rows)} training and {len(val_rows)} validation captions"):
        job.train(too_big)

    # Half the training captions and every validation caption name images that were never
    # extracted: the epoch runs on the other half (a warning), then validation has nothing.
    elsewhere = lambda rows: rows.assign(image=[f"/elsewhere/{i}.jpg" for i in range(len(rows))])
    half = len(train_rows) // 2
    save_split(pd.concat([train_rows[:half], elsewhere(train_rows[half:])]), elsewhere(val_rows), split)
    with pytest.raises(FeatureError, match=f"none of the split's {len(val_rows)} validation captions has an image"):
        job.train(cfg)
    # With none of the training images, the feature statistics (model.feature_norm=channel) are
    # of nothing: the driver stops there (the workers failed on a shape error).
    save_split(elsewhere(train_rows), val_rows, split)
    channel = load_config(REPO / "configs/demo.yaml", [*work, *tiny, "model.feature_norm=channel"])
    with pytest.raises(FeatureError, match="none of the split's training images has features in"):
        job.prepare_feature_stats(channel, job.checked_features(channel), split)

    # The same check, by side and count (each worker applies it to its equal shard or the sum).
    features = "w/features"
    assert loop.coverage("train", 5, 5, 40, features, 8) is None
    assert "after 2 of its 5 steps of 8 captions, so about 16 of the split's 40" in loop.coverage(
        "train", 2, 5, 40, features, 8
    )
    with pytest.raises(FeatureError, match="no training step: fewer than train.batch_size=8 of the split's 40"):
        loop.coverage("train", 0, 5, 40, features, 8)
    assert "validation: 3 of the split's 10 validation captions" in loop.coverage("val", 3, 10, 10, features)


def test_every_extraction_writes_a_new_version_of_the_file_list_on_s3(s3) -> None:
    # S3's ETag digests the content: an extraction that keeps every file name and row count (a
    # retry of failed rows) must still change the version that training's statistics are kept for.
    from capray import featurestore
    from capray.listing import stat

    cfg = s3.config()
    features = f"{s3.bucket('file-list-versions')}/features"
    first = featurestore.write_file_list(features, cfg.storage, "float16")
    before = stat(f"{features}/{FILE_LIST}", cfg.storage)
    again = featurestore.write_file_list(features, cfg.storage, "float16", previous=first)
    assert {**again, "written_at": None} == {**first, "written_at": None}  # the same files and counts
    assert stat(f"{features}/{FILE_LIST}", cfg.storage) != before
