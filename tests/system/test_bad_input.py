"""Bad input, each with a clear outcome: configs, checkpoints that do not fit, corrupted feature shards.

Caption files (missing columns, empty captions, non-UTF-8 bytes), COCO annotations without an
image and the image zoo are covered where their readers are tested: tests/test_readers.py,
tests/test_data.py, tests/test_caption.py and tests/test_extract.py (see docs/reliability.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray import checkpoint, cli, featurestore, train
from capray.checkpoint import CheckpointError
from capray.config import load_config
from capray.featurestore import FEATURE_SHAPE, SCHEMA, FeatureError
from capray.text import Tokenizer


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "key 'train.epochz'.*Did you mean: 'epochs'"),
        ("train.batch_size=-8", "train.batch_size=-8: must be > 0"),
    ],
)
def test_cli_refuses_a_bad_config_with_exit_code_2(override: str, message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", override]) == 2
    assert re.search(message, capsys.readouterr().err)


# --- checkpoints that do not fit -------------------------------------------------------------


def _tokenizer(n_words: int) -> Tokenizer:
    return Tokenizer.fit([" ".join(f"w{i}" for i in range(n_words))], vocab_size=n_words + 3)


def _write_checkpoint(directory: Path, n_words: int = 10, units: int = 16) -> Tokenizer:
    from capray.model import ShowAttendTell, make_optimizer

    tokenizer = _tokenizer(n_words)
    cfg = load_config(None, ["model.embedding_dim=8", f"model.units={units}"])
    model = ShowAttendTell(tokenizer.vocab_size, 8, units).build_all()
    optimizer = make_optimizer(1e-3)
    optimizer.build(model.trainable_variables)
    checkpoint.write(str(directory), model, optimizer, tokenizer, cfg, {"epoch": 1, "step": 1})
    return tokenizer


def test_checkpoint_with_another_vocabulary_is_refused_with_a_message(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "ckpt", n_words=10)
    (tmp_path / "ckpt" / "tokenizer.json").write_text(_tokenizer(25).to_json())
    with pytest.raises(CheckpointError, match="does not fit a model with vocabulary 29, embedding_dim 8, units 16"):
        checkpoint.load(str(tmp_path / "ckpt"))


def test_checkpoint_with_another_architecture_is_refused_with_a_message(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "ckpt", units=16)
    saved = tmp_path / "ckpt" / "config.yaml"
    saved.write_text(saved.read_text().replace("units: 16", "units: 32"))
    with pytest.raises(CheckpointError, match="units 32"):
        checkpoint.load(str(tmp_path / "ckpt"))


def test_resuming_into_another_model_is_refused_with_a_message(tmp_path: Path) -> None:
    """What a training worker does on resume (capray.train): the run's checkpoint, a model built
    from the current config."""
    from capray.model import ShowAttendTell

    _write_checkpoint(tmp_path / "ckpt", n_words=10, units=16)
    other = ShowAttendTell(_tokenizer(25).vocab_size, 8, 16).build_all()
    with pytest.raises(CheckpointError, match="does not fit a model with vocabulary 29, embedding_dim 8, units 16"):
        checkpoint.restore_weights(str(tmp_path / "ckpt"), other)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_optimizer_state_is_refused_not_executed(tmp_path: Path) -> None:
    from capray.model import make_optimizer

    _write_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(str(marker))
    np.savez(tmp_path / "ckpt" / "optimizer.npz", evil)  # numpy pickles object arrays
    optimizer = make_optimizer(1e-3)
    with pytest.raises(CheckpointError, match="optimizer.npz: unreadable optimizer state.*allow_pickle=False"):
        checkpoint.restore_optimizer(str(tmp_path / "ckpt"), optimizer)
    assert not marker.exists()


# --- corrupted feature shards ----------------------------------------------------------------


def _shard(images: list[str], size: int | None = None) -> bytes:
    """A features Parquet file as extraction writes it (zeros as features)."""
    n = int(np.prod(FEATURE_SHAPE)) * 2 if size is None else size
    table = pa.table(
        {
            "image": images,
            "features": [bytes(n)] * len(images),
            "dtype": ["float16"] * len(images),
            "shape": [list(FEATURE_SHAPE)] * len(images),
            "error": [None] * len(images),
        },
        schema=SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _features_dir(root: Path, images: list[str]) -> Path:
    out = root / "features"
    out.mkdir(parents=True)
    (out / "part-a.parquet").write_bytes(_shard(images[:2]))
    (out / "part-b.parquet").write_bytes(_shard(images[2:]))
    featurestore.write_file_list(str(out), None, "float16")
    return out


def test_truncated_shard_is_named_before_training_starts(tmp_path: Path) -> None:
    images = [str(tmp_path / f"img{i}.jpg") for i in range(4)]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"{i},a red circle\n" for i in images))
    work = tmp_path / "work"
    shards = _features_dir(work, images)
    whole = (shards / "part-b.parquet").read_bytes()
    (shards / "part-b.parquet").write_bytes(whole[: len(whole) // 2])
    data = [f"work_dir={work}", "data.format=table", f"data.annotations={tmp_path / 'captions.csv'}"]
    # A batch the 3 training captions fill: a smaller split is refused before the features are read.
    cfg = load_config(None, [*data, "train.batch_size=2"])
    with pytest.raises(FeatureError, match=f"{shards / 'part-b.parquet'}: not a readable Parquet file"):
        train.train(cfg)


def test_shard_disagreeing_with_the_file_list_or_missing_is_named(tmp_path: Path) -> None:
    images = [f"s3://b/img{i}.jpg" for i in range(4)]
    shards = _features_dir(tmp_path, images)
    (shards / "part-b.parquet").write_bytes(_shard(images[2:3]))  # replaced by a shorter file
    with pytest.raises(FeatureError, match=r"part-b\.parquet: 1 rows, its file list says 2"):
        featurestore.verify(str(shards))
    os.remove(shards / "part-b.parquet")
    with pytest.raises(FeatureError, match="listed in its file list are missing: part-b.parquet"):
        featurestore.verify(str(shards))


def test_a_features_folder_of_an_earlier_capray_keeps_its_file_list(tmp_path: Path) -> None:
    # Earlier builds named the file list `_manifest.json`: still read, and replaced when next written.
    images = [f"s3://b/img{i}.jpg" for i in range(4)]
    shards = _features_dir(tmp_path, images)
    os.replace(shards / "_files.json", shards / "_manifest.json")
    assert featurestore.read_file_list(str(shards), None)["rows"] == 4
    (shards / "part-b.parquet").write_bytes(_shard(images[2:3]))
    with pytest.raises(FeatureError, match=r"part-b\.parquet: 1 rows, its file list says 2"):
        featurestore.verify(str(shards))
    featurestore.write_file_list(str(shards), None, "float16")
    assert not (shards / "_manifest.json").exists() and featurestore.read_file_list(str(shards), None)["rows"] == 3


def test_wrong_size_feature_bytes_name_the_file_and_image(tmp_path: Path, ray_local) -> None:
    images = [f"s3://b/img{i}.jpg" for i in range(4)]
    shards = _features_dir(tmp_path, images)
    (shards / "part-b.parquet").write_bytes(_shard(images[2:], size=1000))
    featurestore.write_file_list(str(shards), None, "float16")
    featurestore.verify(str(shards))  # the file itself is valid Parquet: only its content is wrong
    with pytest.raises(
        Exception, match=r"part-b\.parquet: image s3://b/img2\.jpg: feature row of 1000 bytes, expected 262144"
    ):
        featurestore.read_features(str(shards)).take_all()
    with pytest.raises(FeatureError, match="feature row of 1000 bytes"):
        featurestore.decode_features([bytes(1000)], "float16")
