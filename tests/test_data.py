"""More data tests: malformed files, config dispatch, split edge cases and the split file.

tests/test_readers.py covers the readers' normal paths, the by-image split, prepare_split reuse,
the real Flickr8k dev set and S3; this file covers what can go wrong around them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from capray import data, storage
from capray.config import load_config
from capray.data import DataError


def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def _coco(*captions: tuple[int, int, str], images: dict[int, str] | None = None) -> str:
    images = images or {1: "a.jpg", 2: "b.jpg"}
    return json.dumps(
        {
            "images": [{"id": i, "file_name": f} for i, f in images.items()],
            "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions],
        }
    )


@pytest.mark.parametrize(
    "content",
    [
        # An unquoted comma in the first row would otherwise turn `image` into a pandas index.
        "image,caption\na.jpg,A child, in pink\nb.jpg,Dog\n",
        "image,caption\na.jpg,Dog\nb.jpg,A child, in pink\n",
    ],
)
def test_csv_row_with_too_many_fields_is_refused(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path / "captions.csv", content)
    with pytest.raises(DataError, match="captions.csv: malformed CSV"):
        data.read_flickr(path, str(tmp_path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", b"", "malformed CSV"),
        ("junk.parquet", b"not parquet", "not a readable Parquet file"),
        ("m.csv", b"image,caption\na.jpg,caf\xe9\n", "not valid UTF-8"),
    ],
)
def test_unreadable_manifests_name_the_file(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as err:
        data.read_table(path)
    assert name in str(err.value)


@pytest.mark.parametrize("name", ["gone.csv", "gone.parquet", "gone.json"])
def test_missing_file_is_a_data_error(tmp_path: Path, name: str) -> None:
    read = data.read_coco if name.endswith(".json") else data.read_table
    with pytest.raises(DataError, match=f"{name}: file not found"):
        read(str(tmp_path / name), str(tmp_path))


def test_parquet_manifest_missing_column_names_it(tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.jpg"], "text": ["x"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet: missing column\(s\) caption \(found: image, text\)"):
        data.read_table(str(tmp_path / "m.parquet"))


def test_parquet_null_caption_is_refused_not_dropped(tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.jpg", "b.jpg", "c.jpg"], "caption": ["x", None, " "]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match="2 row.* first at data row 2"):
        data.read_table(str(tmp_path / "m.parquet"))


def test_coco_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"c\.json: not valid UTF-8"):
        data.read_coco(_write(tmp_path / "c.json", b'{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}]}'), "")
    no_caption = json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 3, "image_id": 1}]})
    with pytest.raises(DataError, match=r"d\.json: not a COCO captions file \(KeyError: 'caption'\)"):
        data.read_coco(_write(tmp_path / "d.json", no_caption), "")
    with pytest.raises(DataError, match=r"e\.json: 1 row.* first at data row 2"):
        data.read_coco(_write(tmp_path / "e.json", _coco((1, 1, "ok"), (2, 2, "  "))), "")


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    bom = "\ufeff"
    coco = data.read_coco(_write(tmp_path / "c.json", bom + _coco((1, 2, "A cat"))), str(tmp_path / "imgs"))
    assert coco.to_dict("list") == {"image": [str(tmp_path / "imgs" / "b.jpg")], "caption": ["A cat"]}
    flickr = data.read_flickr(_write(tmp_path / "f.csv", bom + "image,caption\nb.jpg,A cat\n"), str(tmp_path / "imgs"))
    assert flickr.equals(coco)


def test_captions_that_look_like_missing_values_are_kept(tmp_path: Path) -> None:
    df = data.read_flickr(_write(tmp_path / "f.csv", "image,caption\na.jpg,NA\nb.jpg,null\n"), str(tmp_path))
    assert df["caption"].tolist() == ["NA", "null"]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"work_dir={tmp_path / 'work'}", *overrides])


def test_read_captions_dispatches_on_format(tmp_path: Path) -> None:
    # synthetic/flickr: names are relative to images/ beside the captions file unless data.images says otherwise.
    csv = _write(tmp_path / "ds" / "captions.csv", "image,caption\nscene_0.jpg,a red circle\n")
    synthetic = data.read_captions(_cfg(tmp_path, "data.format=synthetic", f"data.annotations={csv}"))
    assert synthetic["image"].tolist() == [str(tmp_path / "ds" / "images" / "scene_0.jpg")]
    flickr = data.read_captions(
        _cfg(tmp_path, "data.format=flickr", f"data.annotations={csv}", "data.images=s3://b/flickr")
    )
    assert flickr["image"].tolist() == ["s3://b/flickr/scene_0.jpg"]
    # manifest: relative to the manifest's own folder.
    manifest = data.read_captions(_cfg(tmp_path, "data.format=table", f"data.annotations={csv}"))
    assert manifest["image"].tolist() == [str(tmp_path / "ds" / "scene_0.jpg")]
    coco_json = _write(tmp_path / "ann.json", _coco((5, 1, "x")))
    coco = data.read_captions(
        _cfg(tmp_path, "data.format=coco", f"data.annotations={coco_json}", f"data.images={tmp_path}/train")
    )
    assert coco["image"].tolist() == [str(tmp_path / "train" / "a.jpg")]
    with pytest.raises(DataError, match="data.annotations is empty"):
        data.read_captions(_cfg(tmp_path, "data.format=coco"))


def _captions(n_images: int, per_image: int) -> pd.DataFrame:
    return pd.DataFrame(
        [(f"img{i}.jpg", f"caption {i} {j}") for i in range(n_images) for j in range(per_image)],
        columns=["image", "caption"],
    )


@pytest.mark.parametrize("num_examples", [0, 30, 1000])
def test_sample_split_zero_or_too_many_takes_everything(num_examples: int) -> None:
    df = _captions(10, 3)
    train, val = data.sample_split(df, num_examples, 0.2, seed=0)
    assert len(train) + len(val) == len(df)
    assert len(set(val["image"])) == 2 and not set(train["image"]) & set(val["image"])
    assert sorted(pd.concat([train, val])["caption"]) == sorted(df["caption"])


def test_sample_split_keeps_file_order_and_a_train_image() -> None:
    df = _captions(4, 10)
    train, val = data.sample_split(df, 12, 0.9, seed=3)
    position = {c: i for i, c in enumerate(df["caption"])}
    for part in (train, val):
        assert part["caption"].map(position).is_monotonic_increasing
    # val_fraction close to 1 still leaves one image for training.
    assert train["image"].nunique() >= 1 and val["image"].nunique() >= 1
    assert list(train.index) == list(range(len(train)))


def test_save_and_load_split_round_trip(tmp_path: Path) -> None:
    train, val = data.sample_split(_captions(10, 2), 0, 0.2, seed=5)
    uri = str(tmp_path / "out" / "split.parquet")
    data.save_split(train, val, uri)
    table = pq.read_table(uri)
    assert table.column_names == ["image", "caption", "split"]
    # Sorted by image (a batch of features reads only its images' row groups), captions of an
    # image in their order.
    images = sorted(range(10), key=lambda i: f"img{i}.jpg")
    assert table.column("caption").to_pylist() == [f"caption {i} {j}" for i in images for j in range(2)]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["split.parquet"]  # no temp file left behind
    loaded_train, loaded_val = data.load_split(uri)
    by_image = lambda df: df.sort_values("image", kind="stable", ignore_index=True)
    assert loaded_train.equals(by_image(train)) and loaded_val.equals(by_image(val))


def test_split_file_row_groups_are_bounded(tmp_path: Path) -> None:
    df = _captions(data.SPLIT_ROW_GROUP // 2 + 1, 3)  # 1.5 row groups' worth and a bit
    data.save_split(df.iloc[:-3], df.iloc[-3:], str(tmp_path / "split.parquet"))
    meta = pq.ParquetFile(tmp_path / "split.parquet").metadata
    assert meta.num_rows == len(df)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [
        data.SPLIT_ROW_GROUP,
        len(df) - data.SPLIT_ROW_GROUP,
    ]


def test_s3_errors_are_data_errors(s3) -> None:
    bucket = s3.bucket("data-errors")
    cfg = s3.config()
    storage.write_bytes(f"{bucket}/m.csv", b"image,caption\na.jpg,caf\xe9\n", cfg.storage)
    with pytest.raises(DataError, match=f"{bucket}/m.csv: not valid UTF-8"):
        data.read_table(f"{bucket}/m.csv", storage_cfg=cfg.storage)
    with pytest.raises(DataError, match=f"{bucket}/gone.parquet: file not found"):
        data.read_table(f"{bucket}/gone.parquet", storage_cfg=cfg.storage)
