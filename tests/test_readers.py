"""Data tests: the three caption readers, bad inputs, and the seed's by-image split."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from capray import data
from capray.data import DataError


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_read_coco_resolves_file_names(tmp_path: Path) -> None:
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": " A dog. "},
            {"id": 11, "image_id": 2, "caption": "A cat"},
            {"id": 12, "image_id": 1, "caption": "Dog on grass"},
        ],
    }
    df = data.read_coco(_write(tmp_path / "c.json", json.dumps(ann)), "s3://bucket/train2014")
    assert df["image"].tolist() == [
        "s3://bucket/train2014/a.jpg",
        "s3://bucket/train2014/b.jpg",
        "s3://bucket/train2014/a.jpg",
    ]
    assert df["caption"].tolist() == ["A dog.", "A cat", "Dog on grass"]


def test_read_coco_annotation_without_image_is_an_error(tmp_path: Path) -> None:
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 7, "image_id": 99, "caption": "x"}]}
    with pytest.raises(DataError, match="annotation 7 refers to image_id 99"):
        data.read_coco(_write(tmp_path / "c.json", json.dumps(ann)), str(tmp_path))


def test_read_flickr_csv(tmp_path: Path) -> None:
    csv = _write(tmp_path / "captions.csv", 'image,caption\n1.jpg,"A child, in pink."\n1.jpg,Girl\n2.jpg,Dog\n')
    df = data.read_flickr(csv, str(tmp_path / "images"))
    assert df["image"].tolist() == [str(tmp_path / "images" / n) for n in ("1.jpg", "1.jpg", "2.jpg")]
    assert df["caption"][0] == "A child, in pink."


def test_read_flickr_token_file_as_the_datasets_ship_it(tmp_path: Path) -> None:
    token = _write(
        tmp_path / "Flickr8k.token.txt",
        '1.jpg#0\tA child, in pink .\r\n1.jpg#1\tGirl\r\n2.jpg#0\tDog # 1\t"Spot"\r\n\r\n',
    )
    csv = _write(
        tmp_path / "captions.csv", 'image,caption\n1.jpg,"A child, in pink ."\n1.jpg,Girl\n2.jpg,"Dog # 1\t""Spot"""\n'
    )
    images = str(tmp_path / "images")
    assert data.read_flickr(token, images).equals(data.read_flickr(csv, images))
    bad = _write(tmp_path / "mixed.token", "1.jpg#0\tA dog\n2.jpg,A cat\n")
    with pytest.raises(DataError, match=r"mixed\.token: line 2 is not <image>#<n><TAB><caption>, as the first line is"):
        data.read_flickr(bad, images)


def test_read_manifest_csv_and_parquet_resolution(tmp_path: Path) -> None:
    rows = pd.DataFrame({"image": ["rel/a.jpg", "/abs/b.jpg", "s3://bkt/c.jpg"], "caption": ["x", "y", "z"]})
    rows.to_csv(tmp_path / "m.csv", index=False)
    rows.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        df = data.read_table(str(tmp_path / name))
        assert df["image"].tolist() == [str(tmp_path / "rel/a.jpg"), "/abs/b.jpg", "s3://bkt/c.jpg"]
    assert data.read_table(str(tmp_path / "m.csv"), images="/root")["image"][0] == "/root/rel/a.jpg"


@pytest.mark.parametrize(
    "content, message",
    [
        ("image,text\na.jpg,x\n", "missing column"),
        ("image,caption\na.jpg,x\nb.jpg,   \n", "empty image or caption, first at data row 2"),
        (b"image,caption\na.jpg,caf\xe9\n", "not valid UTF-8"),
    ],
)
def test_bad_caption_files_are_refused_with_the_reason(tmp_path: Path, content, message: str) -> None:
    path = _write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=message) as err:
        data.read_flickr(path, str(tmp_path))
    assert "bad.csv" in str(err.value)


def _captions(n_images: int, per_image: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        [(f"img{i}.jpg", f"caption {i} {j}") for i in range(n_images) for j in range(per_image)],
        columns=["image", "caption"],
    )


def test_split_is_by_image_sized_and_seeded() -> None:
    df = _captions(50)
    train, val = data.sample_split(df, num_examples=200, val_fraction=0.2, seed=1)
    assert len(train) + len(val) == 200
    assert not set(train["image"]) & set(val["image"])
    n_images = len(set(train["image"]) | set(val["image"]))
    assert len(set(val["image"])) == pytest.approx(0.2 * n_images, abs=1)
    again = data.sample_split(df, 200, 0.2, seed=1)
    assert again[0].equals(train) and again[1].equals(val)
    other = data.sample_split(df, 200, 0.2, seed=2)
    assert set(other[1]["image"]) != set(val["image"])


def test_split_needs_two_images() -> None:
    with pytest.raises(DataError, match="at least 2 distinct images"):
        data.sample_split(_captions(1), 0, 0.2, 0)


def test_read_real_flickr8k_dev(flickr_dev: Path) -> None:
    df = data.read_flickr(str(flickr_dev / "captions.csv"), str(flickr_dev / "images"))
    assert len(df) == 2490 and df["image"].nunique() == 498
    assert Path(df["image"][0]).is_file()
