"""The training split as data on local Ray: made and saved by a Ray task, reused, counted into the
tokenizer by Ray Data, paired with the features in tasks; split files and tokenizers that an
earlier capray saved still load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray import data, storage
from capray.config import load_config, output_paths
from capray.data import DataError
from capray.featurestore import FEATURE_SHAPE, SCHEMA, caption_dataset, decode_features, read_features, side_features
from capray.text import Tokenizer

# Ties at every count (a/b/c twice, b first; d/e once), specials in captions, and the longest
# caption on the validation side, where it must not set max_length.
OLD_ROWS = [
    ("img3.jpg", "b a", "train"),
    ("img1.jpg", "a b c", "train"),
    ("img3.jpg", "<start> c d", "train"),
    ("img2.jpg", "E <end>", "train"),
    ("img1.jpg", "d <pad>", "train"),
    ("img0.jpg", "f g h i j k l m n o", "val"),
    ("img4.jpg", "a a a a", "val"),
]


def _old_split_file(uri: str) -> pd.DataFrame:
    """A split file as capray wrote it before the split moved to Ray tasks: training rows then
    validation rows, each in the captions file's order (not sorted by image), one row group."""
    df = pd.DataFrame(OLD_ROWS, columns=["image", "caption", "split"])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return df


def _features(folder: Path, images: list[str]) -> None:
    """A features folder of stand-in rows: image k's features are all k (float16), in two files."""
    folder.mkdir(parents=True)
    for part in (0, 1):
        names = images[part::2]
        blobs = [np.full(FEATURE_SHAPE, int(n[3]), np.float16).tobytes() for n in names]
        table = pa.table(
            {
                "image": names,
                "features": blobs,
                "dtype": ["float16"] * len(names),
                "shape": [list(FEATURE_SHAPE)] * len(names),
                "error": pa.nulls(len(names), pa.string()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"part-{part}.parquet")


def _pairs(ds, tokenizer: Tokenizer) -> list[tuple[int, str]]:
    """(the image's number, the caption decoded) of every row of a caption dataset."""
    out = []
    for batch in ds.iter_batches(batch_size=None):
        feats = decode_features(batch["features"], batch["dtype"][0])
        out += [(int(f[0, 0]), tokenizer.decode(c)) for f, c in zip(feats, batch["captions"])]
    return sorted(out)


def test_vocabulary_counted_by_ray_data_equals_fit_with_ties(ray_local, tmp_path: Path) -> None:
    uri = str(tmp_path / "split.parquet")
    df = _old_split_file(uri)
    # Row groups of 2 rows, one per task: words are first seen in one task and counted again in others.
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), uri, row_group_size=2)
    train = list(df[df["split"] == "train"]["caption"])
    for vocab_size in (5, 9):  # 5: the cut falls inside the a/b/c tie
        expected = Tokenizer.fit(train, vocab_size)
        got = data.count_vocabulary(uri, None, vocab_size, groups_per_task=1)
        assert got == expected, (got.words, expected.words)
    assert expected.max_length == 5  # "a b c" + <start>/<end>, not the longer validation caption
    assert data.count_vocabulary(uri, None, 9, max_length=3).max_length == 3


def test_old_split_file_and_tokenizer_keep_loading(ray_local, tmp_path: Path) -> None:
    from capray.train.job import prepare_tokenizer

    work = tmp_path / "work"
    cfg = load_config(None, [f"work_dir={work}", "data.format=flickr", f"data.annotations={tmp_path / 'none.csv'}"])
    p = output_paths(cfg)
    df = _old_split_file(p["split"])
    before = Path(p["split"]).read_bytes()
    # Reused as it is: not made again (there is no captions file to make it from), not rewritten.
    assert data.prepare_split(cfg) == p["split"] and Path(p["split"]).read_bytes() == before
    saved = Tokenizer(["<pad>", "<unk>", "<start>", "<end>", "zebra"], 7)
    Path(p["tokenizer"]).write_text(saved.to_json())
    assert prepare_tokenizer(cfg, p["split"]) == saved
    train, val = df[df["split"] == "train"], df[df["split"] == "val"]
    assert data.load_side(p["split"], None, "val").equals(val[["image", "caption"]].reset_index(drop=True))
    assert data.split_rows(p["split"], None, "train") == len(train)
    assert data.split_rows(p["split"], None, "val") == len(val)

    # Its captions reach the tasks as data: every caption of each side once, with its image.
    _features(work / "features", [f"img{k}.jpg" for k in range(6)])  # img5 has no caption
    features = read_features(str(work / "features"))
    tokenizer = data.count_vocabulary(p["split"], None, 100)
    assert tokenizer == Tokenizer.fit(list(train["caption"]), 100)
    for side, rows in (("train", train), ("val", val)):
        got = _pairs(caption_dataset(features, p["split"], None, side, tokenizer), tokenizer)
        expected = sorted(
            (int(i[3]), tokenizer.decode(tokenizer.encode(c))) for i, c in zip(rows["image"], rows["caption"])
        )
        assert got == expected
    # The statistics' input: the training images, each once.
    kept = side_features(features, p["split"], None, "train").take_all()
    assert sorted(r["image"] for r in kept) == ["img1.jpg", "img2.jpg", "img3.jpg"]


def test_split_made_by_a_task_then_reused(ray_local, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv = tmp_path / "captions.csv"
    rows = [(f"img{i}.jpg", f"caption {i} {j}") for i in range(20) for j in range(2)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(csv, index=False)
    cfg = load_config(
        None, [f"work_dir={tmp_path / 'work'}", "data.format=flickr", f"data.annotations={csv}", "data.num_examples=30"]
    )
    uri = data.prepare_split(cfg)
    first = data.load_split(uri)
    # The seed's sampling and by-image split, sorted by image in the file.
    expected = data.sample_split(data.read_captions(cfg), 30, cfg.data.val_fraction, cfg.data.seed)
    by_image = lambda df: df.sort_values("image", kind="stable", ignore_index=True)
    assert first[0].equals(by_image(expected[0])) and first[1].equals(by_image(expected[1]))
    assert data.load_side(uri, None, "val").equals(first[1]) and data.load_side(uri, None, "train").equals(first[0])
    # Its footer holds the count of each side, which training reads instead of a Ray Data pass
    # (the old file above has none: counted there).
    footer = pq.ParquetFile(uri).schema_arrow.metadata
    assert json.loads(footer[data.SPLIT_ROWS_KEY]) == {"train": len(first[0]), "val": len(first[1])}
    assert (data.split_rows(uri, None, "train"), data.split_rows(uri, None, "val")) == (len(first[0]), len(first[1]))
    with caplog.at_level(logging.WARNING, logger="capray.data"):
        assert data.prepare_split(cfg) == uri
    assert not caplog.records  # reused, nothing changed
    # The dataset and a data.* key change: the split is kept as it is (a run keeps its data),
    # and the run says so, naming what changed.
    pd.DataFrame(rows[:10], columns=["image", "caption"]).to_csv(csv, index=False)
    cfg.data.num_examples = 0
    with caplog.at_level(logging.WARNING, logger="capray.data"):
        assert data.prepare_split(cfg) == uri
    second = data.load_split(uri)
    assert first[0].equals(second[0]) and first[1].equals(second[1])
    assert [r.getMessage() for r in caplog.records] == [
        f"{uri} is reused as it is, though the data it was made from differs now (data.num_examples: 30 -> 0; "
        "data.annotations: the file has changed since): a run keeps the split it started with; for a split of "
        "the data as it is now, give another work_dir (or delete split.parquet, tokenizer.json and features/ there)"
    ]


def test_split_task_errors_are_data_errors(ray_local, tmp_path: Path) -> None:
    csv = tmp_path / "captions.csv"
    csv.write_text("image,text\na.jpg,one\n")
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "data.format=flickr", f"data.annotations={csv}"])
    with pytest.raises(DataError, match=r"captions.csv: missing column\(s\) caption"):
        data.prepare_split(cfg)
    assert not storage.exists(output_paths(cfg)["split"])


def test_manifest_and_split_on_s3(ray_local, s3) -> None:
    bucket = s3.bucket("captions")
    cfg = s3.config(f"work_dir={bucket}/work", "data.format=table", f"data.annotations={bucket}/m.csv")
    storage.write_bytes(f"{bucket}/m.csv", b"image,caption\nphotos/a.jpg,one\nphotos/b.jpg,two\n", cfg.storage)
    uri = data.prepare_split(cfg)
    assert uri == f"{bucket}/work/split.parquet" and storage.exists(uri, cfg.storage)
    train, val = data.load_split(uri, cfg.storage)
    assert sorted(pd.concat([train, val])["image"]) == [f"{bucket}/photos/a.jpg", f"{bucket}/photos/b.jpg"]
    assert len(train) == len(val) == 1
    assert data.split_rows(uri, cfg.storage, "val") == 1
    found = data.captions_of([val["image"][0], "s3://elsewhere/x.jpg"], uri, cfg.storage, "val")
    assert found.to_pylist() == [{"image": val["image"][0], "caption": val["caption"][0]}]
