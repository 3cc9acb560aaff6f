"""capray as a library: the Ray Data building blocks on a user's own dataset, and the jobs as
Python functions (the in-process `Captioner` against the caption job: tests/test_caption.py)."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images

import capray
from capray.featurestore import decode_features
from capray.images import decode
from capray.inputs import InputError


@pytest.fixture(scope="module")
def items() -> list[dict]:
    """A user's rows: image bytes, an id and a licence; one of them not an image."""
    good = good_images()
    rows = [{"image": good[n], "id": i, "licence": f"cc-{i}"} for i, n in enumerate(sorted(good))]
    rows.append({"image": bad_images()["truncated.jpg"][0], "id": 99, "licence": "cc-99"})
    return rows


def test_caption_predictor_maps_over_a_users_dataset(ray_local, tiny_checkpoint: str, items: list[dict]) -> None:
    ds = ray.data.from_items(items)
    out = (
        ds.map_batches(
            capray.CaptionPredictor,
            fn_constructor_kwargs={
                "checkpoint": tiny_checkpoint,
                "strategy": "beam",
                "beam_size": 2,
                "max_pixels": TEST_MAX_PIXELS,
            },
            batch_size=3,
            concurrency=1,
        )
        .to_pandas()
        .set_index("id")
        .sort_index()
    )  # Ray Data does not keep the row order
    assert len(out) == len(items)
    # The user's own columns come through; the image bytes are consumed, not copied into the output.
    assert (
        list(out["licence"]) == [r["licence"] for r in sorted(items, key=lambda r: r["id"])]
        and out["image"].isna().all()
    )
    assert out.loc[99, "error"] and pd.isna(out.loc[99, "caption"])
    good = out.drop(index=99)
    assert good["error"].isna().all() and (good["strategy"] == "beam2").all()
    expected = capray.Captioner.load(tiny_checkpoint, "beam", beam_size=2, max_pixels=TEST_MAX_PIXELS).caption(
        [r["image"] for r in items[:-1]]
    )
    assert list(good["caption"]) == [c.text for c in expected]


def test_feature_extractor_maps_over_a_users_dataset(ray_local, items: list[dict]) -> None:
    from capray.model import Backbone

    ds = ray.data.from_items(items[:3]).rename_columns({"image": "jpeg"})
    out = (
        ds.map_batches(
            capray.FeatureExtractor,
            fn_constructor_kwargs={"weights": "random", "dtype": "float32", "image_column": "jpeg"},
            batch_size=2,
            concurrency=1,
        )
        .to_pandas()
        .sort_values("id")
    )
    assert out["error"].isna().all() and list(out["licence"]) == ["cc-0", "cc-1", "cc-2"]
    features = decode_features(out["features"], "float32")
    pixels = np.stack([decode(r["image"], TEST_MAX_PIXELS) for r in items[:3]])
    np.testing.assert_allclose(features, Backbone("random", seed=0)(pixels), rtol=1e-4, atol=1e-4)


def test_a_dataset_without_an_image_column_is_refused_naming_it(ray_local, items: list[dict]) -> None:
    ds = ray.data.from_items(items[:2]).rename_columns({"image": "blob"})
    with pytest.raises(Exception, match="batch has no `image` or `pixels` column"):
        ds.map_batches(capray.FeatureExtractor, fn_constructor_kwargs={"weights": "random"}, concurrency=1).take_all()


def test_the_caption_job_as_a_function(ray_local, tiny_checkpoint: str, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("scene.jpg", "gray.jpg"):
        (folder / name).write_bytes(good_images()[name])
    summary = capray.caption(
        "configs/demo.yaml",
        input=str(folder),
        output=str(tmp_path / "out"),
        checkpoint=tiny_checkpoint,
        work_dir=str(tmp_path / "work"),
        caption={"batch_size": 4},
    )
    assert (summary["written"], summary["captioned"], summary["failed"]) == (2, 2, 0)
    rows = pd.read_parquet(tmp_path / "out")
    assert sorted(Path(i).name for i in rows["image"]) == ["gray.jpg", "scene.jpg"]
    with pytest.raises(InputError, match="input"):
        capray.caption("configs/demo.yaml", checkpoint=tiny_checkpoint, work_dir=str(tmp_path / "work"))


def test_job_configs_from_python_are_checked_like_the_cli(tmp_path: Path) -> None:
    from capray.api import config
    from capray.config import ConfigError

    cfg = config("configs/demo.yaml", {"train": {"epochs": 3}, "work_dir": str(tmp_path)})
    assert cfg.train.epochs == 3 and cfg.work_dir == str(tmp_path)
    again = config(cfg, ["train.epochs=4"])
    assert (again.train.epochs, cfg.train.epochs) == (4, 3)  # the given config is not changed
    with pytest.raises(ConfigError, match="trian"):
        config(None, {"trian": {"epochs": 3}})


def _defaults(cls: type) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def test_the_classes_keyword_defaults_are_the_configs() -> None:
    """A keyword left out means what the same key left out of a job's config means: the schema is
    the one home of every default, so a class cannot drift from the jobs."""
    from omegaconf import OmegaConf

    from capray.schema import Config

    cfg = OmegaConf.structured(Config)
    extractor = capray.FeatureExtractor.arguments(cfg)
    predictor = capray.CaptionPredictor.arguments(cfg, "a checkpoint")
    captioner = {k: v for k, v in predictor.items() if k in _defaults(capray.Captioner)}
    captioner["batch_size"] = cfg.caption.batch_size
    for cls, expected in [
        (capray.FeatureExtractor, extractor),
        (capray.CaptionPredictor, predictor),
        (capray.Captioner, captioner),
    ]:
        expected = {k: v for k, v in expected.items() if k not in ("checkpoint", "storage")}
        defaults = _defaults(cls)
        assert {k: defaults.get(k, "(none)") for k in expected} == expected, cls.__name__
        # Keywords with no config key: where to find the image column and storage settings.
        assert set(defaults) - set(expected) <= {"image_column", "storage"}, cls.__name__


def test_a_folder_that_is_not_a_checkpoint_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    from capray.checkpoint import CheckpointError

    (tmp_path / "model.weights.h5").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="is not a complete capray checkpoint: missing tokenizer.json, config.yaml, state.json"
    ):
        capray.Captioner.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        capray.Captioner.load(str(tmp_path / "nowhere"))


def test_a_folder_above_checkpoints_names_the_best_ones_below_it(tiny_checkpoint: str, tmp_path: Path) -> None:
    from capray.checkpoint import CheckpointError

    runs = tmp_path / "work" / "runs"
    for name in ("a", "b"):
        shutil.copytree(tiny_checkpoint, runs / name / "best")
    (runs / "c").mkdir()  # a run without a best checkpoint yet
    for given, named in [
        (runs / "a", f"; it is a training run's folder: its best checkpoint is {runs / 'a' / 'best'}"),
        (runs, f"; the best checkpoints of the training runs below it: {runs / 'a' / 'best'}, {runs / 'b' / 'best'}"),
        (
            tmp_path / "work",
            f"; the best checkpoints of the training runs below it: {runs / 'a' / 'best'}, {runs / 'b' / 'best'}",
        ),
    ]:
        with pytest.raises(CheckpointError) as e:
            capray.Captioner.load(str(given))
        assert str(e.value).endswith(
            f"is not a complete capray checkpoint: missing model.weights.h5, tokenizer.json, config.yaml, state.json{named}"
        )
