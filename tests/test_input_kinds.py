"""System tests: each input kind (prefix, manifest, manifest folder, WebDataset tars, Parquet with
image bytes) through both image jobs, from a real S3-protocol server on local Ray."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray import features, storage
from capray.config import output_paths
from capray.infer import caption
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images, tar_shard

GOOD = ["scene.jpg", "gray.jpg", "alpha.png", "cmyk.jpg"]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def kinds(s3) -> dict[str, tuple[str, dict[str, str | None], list[str]]]:
    """kind -> (input URI, {row key: expected error fragment or None}, pass-through columns)."""
    bucket, cfg = s3.bucket("kinds"), s3.config()
    put = lambda key, data: storage.write_bytes(f"{bucket}/{key}", data, cfg.storage)  # noqa: E731
    imgs = good_images()
    for name in GOOD:
        put(f"img/{name}", imgs[name])
    put("img/sub/notes.jpg", bad_images()["notes.jpg"][0])
    in_prefix = {f"{bucket}/img/{n}": None for n in GOOD} | {f"{bucket}/img/sub/notes.jpg": "cannot decode"}

    manifest = pd.DataFrame({"image": [f"img/{n}" for n in GOOD] + ["img/missing.jpg"], "id": ["1", "2", "3", "4", "5"],
                             "licence": ["cc-by"] * 5})
    put("one.csv", manifest.to_csv(index=False).encode())
    one = {f"{bucket}/img/{n}": None for n in GOOD} | {f"{bucket}/img/missing.jpg": "cannot read file"}
    # A folder of manifests: Parquet and CSV side by side, absolute URIs.
    put("manifests/a.parquet", _parquet_bytes(pa.table({"image": [f"{bucket}/img/{n}" for n in GOOD[:2]], "id": ["a", "b"]})))
    put("manifests/b.csv", f"image,id\n{bucket}/img/{GOOD[2]},c\n{bucket}/img/{GOOD[3]},d\n".encode())
    folder = {f"{bucket}/img/{n}": None for n in GOOD}

    put("wds/00000.tar", tar_shard({"a": imgs["scene.jpg"], "b": imgs["gray.jpg"]}))
    whole = tar_shard({"c": imgs["cmyk.jpg"], "d": imgs["alpha.png"], "e": imgs["scene.jpg"]})
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmember("e.jpg").offset_data + 100
    put("wds/00001.tar", whole[:cut])
    put("wds/00000.parquet", _parquet_bytes(pa.table({"key": ["a"]})))  # img2dataset's metadata beside the tars: ignored
    tars = {"00000/a": None, "00000/b": None, "00001/c": None, "00001/d": None, "00001/e": "truncated or corrupt tar"}

    put("laion/00000.parquet", _parquet_bytes(pa.table({"key": ["k0", "k1", "k2"], "jpg": [imgs["scene.jpg"], imgs["gray.jpg"], b"junk"],
                                                       "url": ["http://u/0", "http://u/1", "http://u/2"]})))
    laion = {"k0": None, "k1": None, "k2": "cannot decode"}
    return {
        "prefix": (f"{bucket}/img", in_prefix, []),
        "manifest": (f"{bucket}/one.csv", one, ["id", "licence"]),
        "manifest_folder": (f"{bucket}/manifests", folder, ["id"]),
        "webdataset": (f"{bucket}/wds", tars, ["caption", "json"]),
        "parquet_bytes": (f"{bucket}/laion", laion, ["url"]),
    }


def _check(rows: pd.DataFrame, expected: dict[str, str | None]) -> None:
    assert sorted(rows["image"]) == sorted(expected) and rows["image"].is_unique
    by_key = rows.set_index("image")["error"]
    for key, fragment in expected.items():
        if fragment is None:
            assert pd.isna(by_key[key]), f"{key}: {by_key[key]}"
        else:
            assert fragment in by_key[key]


@pytest.mark.parametrize("kind", ["prefix", "manifest", "manifest_folder", "webdataset", "parquet_bytes"])
def test_every_input_kind_through_caption_and_extract(kind: str, kinds, s3, tiny_checkpoint: str, ray_local) -> None:
    uri, expected, passed = kinds[kind]
    work = s3.bucket("work-" + kind.replace("_", "-")) + "/run"
    cfg = s3.config(f"work_dir={work}", f"data.max_pixels={TEST_MAX_PIXELS}", "infer.batch_size=2", "extract.batch_size=2",
                    "encoder.weights=random", "inputs.shard_rows=2")
    fs, _ = storage.filesystem(work, cfg.storage)

    out = f"{work}/captions"
    summary = caption(cfg, tiny_checkpoint, uri, out)
    rows = pq.ParquetDataset(out[len("s3://"):], filesystem=fs).read().to_pandas()
    _check(rows, expected)
    assert summary["written"] == len(expected) and summary["failed"] == sum(v is not None for v in expected.values())
    captioned = rows[rows["error"].isna()]
    assert captioned["caption"].notna().all() and (captioned["num_tokens"] >= 1).all()
    # The input's own columns follow; a name the job uses itself gets an `input_` prefix.
    renamed = ["input_caption" if c == "caption" else c for c in passed]
    assert list(rows.columns) == ["image", "caption", "log_prob", "num_tokens", "strategy", "model", "error", *renamed]
    if kind == "manifest":
        assert rows.set_index("image").loc[f"{uri.rsplit('/', 1)[0]}/img/cmyk.jpg", "id"] == "4"
    if kind == "webdataset":
        assert rows.set_index("image").loc["00000/b", "input_caption"] == "caption of b"

    cfg.extract.input = uri
    extracted = features.run(cfg)
    assert extracted["extracted"] == sum(v is None for v in expected.values())
    table = pq.ParquetDataset(output_paths(cfg)["features"][len("s3://"):], filesystem=fs).read().to_pandas()
    _check(table, expected)
    assert list(table.columns) == [*features.SCHEMA.names, *passed]
    # Re-runs skip every shard: nothing is read again.
    assert caption(cfg, tiny_checkpoint, uri, out)["shards_written"] == 0
    assert features.run(cfg)["shards_written"] == 0

