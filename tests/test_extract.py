"""System tests: the extraction job from a real S3-protocol server, to S3 and to local disk."""

from __future__ import annotations

import glob
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images

from capray import extraction, featurestore, storage
from capray.config import output_paths
from capray.images import decode
from capray.model import Backbone


@pytest.fixture(scope="module")
def photos(s3) -> str:
    """A bucket of good and broken images plus a manifest with one caption per image."""
    bucket = s3.bucket("photos")
    cfg = s3.config()
    files = {**good_images(), **{k: v for k, (v, _) in bad_images().items()}}
    for name, data in files.items():
        storage.write_bytes(f"{bucket}/img/{name}", data, cfg.storage)
    manifest = pd.DataFrame({"image": [f"img/{n}" for n in files], "caption": ["a thing"] * len(files)})
    storage.write_bytes(f"{bucket}/manifest.csv", manifest.to_csv(index=False).encode(), cfg.storage)
    return bucket


def _config(s3, photos: str, work_dir: str):
    return s3.config(
        f"work_dir={work_dir}",
        "data.format=table",
        f"data.annotations={photos}/manifest.csv",
        f"data.max_pixels={TEST_MAX_PIXELS}",
        "backbone.weights=random",
        "extract.batch_size=4",
    )


def _table(cfg) -> pd.DataFrame:
    fs, path = storage.filesystem(output_paths(cfg)["features"], cfg.storage)
    return pq.ParquetDataset(path, filesystem=fs).read().to_pandas()


def test_s3_to_s3_features_errors_and_resume(s3, photos: str, ray_local) -> None:
    cfg = _config(s3, photos, f"{s3.bucket('work')}/run")
    summary = extraction.run(cfg)
    n_good, n_bad = len(good_images()), len(bad_images())
    assert (summary["extracted"], summary["failed"]) == (n_good, n_bad)

    table = _table(cfg)
    assert len(table) == n_good + n_bad and table["image"].is_unique
    failed = table[table["error"].notna()].set_index("image")["error"]
    for name, (_, reason) in bad_images().items():
        assert reason in failed[f"{photos}/img/{name}"]

    # The stored features are what the model gives for the same image (float16 rounding).
    encoder = Backbone("random", seed=0)
    for name in ("scene.jpg", "dir with space/ünïcode café.jpg", "cmyk.jpg"):
        row = table.set_index("image").loc[f"{photos}/img/{name}"]
        stored = featurestore.decode_features([row["features"]], row["dtype"])[0]
        direct = encoder(decode(good_images()[name], TEST_MAX_PIXELS)[None])[0]
        np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=1e-5)
        assert list(row["shape"]) == [64, 2048] and row["dtype"] == "float16"

    assert sorted(failed.index) == sorted(f"{photos}/img/{n}" for n in bad_images())
    assert (table.loc[table["error"].notna(), "features"].str.len() == 0).all()  # error rows hold no features
    assert {key for key, _ in summary["errors"]} <= set(failed.index) and summary["errors"]
    assert storage.exists(f"{output_paths(cfg)['features']}/_capray_config.yaml", cfg.storage)
    manifest = json.loads(storage.read_bytes(f"{output_paths(cfg)['features']}/_files.json", cfg.storage))
    assert manifest["rows"] == n_good + n_bad and manifest["shape"] == [64, 2048]

    again = extraction.run(cfg)
    assert (again["extracted"], again["failed"], again["skipped"]) == (0, 0, n_good + n_bad)
    assert len(_table(cfg)) == n_good + n_bad


def test_s3_to_local_disk_overwrite_and_another_dtype_refused(s3, photos: str, tmp_path, ray_local) -> None:
    cfg = _config(s3, photos, str(tmp_path / "run"))
    assert extraction.run(cfg)["extracted"] == len(good_images())
    files = sorted(glob.glob(f"{output_paths(cfg)['features']}/[!_]*.parquet"))
    assert files and pq.ParquetFile(files[0]).metadata.row_group(0).column(1).compression == "ZSTD"  # the default
    cfg.extract.overwrite, cfg.extract.compression = True, "none"
    assert extraction.run(cfg)["extracted"] == len(good_images())
    assert len(_table(cfg)) == len(good_images()) + len(bad_images())
    files = sorted(glob.glob(f"{output_paths(cfg)['features']}/[!_]*.parquet"))
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(1).compression == "UNCOMPRESSED"
    # Without --overwrite, a folder of float16 features takes no float32 ones.
    cfg.extract.overwrite, cfg.extract.dtype = False, "float32"
    with pytest.raises(ValueError, match="holds float16 features but extract.dtype=float32"):
        extraction.run(cfg)


def test_the_features_column_points_into_the_batch_without_copies() -> None:
    feats = np.arange(2 * 64 * 2048, dtype=np.float16).reshape(2, 64, 2048)
    column = extraction.features_column(feats, np.array([True, False, True]))
    assert column.type == pa.binary() and len(column) == 3
    rows = column.to_pylist()
    assert rows[1] == b"" and rows[0] == feats[0].tobytes() and rows[2] == feats[1].tobytes()
    assert extraction.features_column(np.zeros((0, 64, 2048), np.float16), np.array([False])).to_pylist() == [b""]
