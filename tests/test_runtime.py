"""How capray's jobs set up Ray (capray.runtime), seen on the session's local Ray."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from capray.featurestore import FEATURE_SHAPE, FILE_LIST, SCHEMA, read_features, read_file_list
from capray.runtime import FOOTER_ACTORS


def _actors_by_class() -> collections.Counter[str]:
    # Ray's public state API (ray.util.state) asks the dashboard, which the session's Ray runs
    # without; the GCS's actor table, dead actors included, is what it reads.
    return collections.Counter(a["ActorClassName"] for a in ray._private.state.actors().values())


def _footer_readers_of_a_read(folder: Path) -> int:
    before = _actors_by_class()["FooterReader"]
    assert read_features(str(folder)).count() > 0
    return _actors_by_class()["FooterReader"] - before


def _stand_in_features(folder: Path, files: int) -> None:
    """`files` Parquet files of one float16 feature row each, and their file list."""
    folder.mkdir()
    blob = np.zeros(FEATURE_SHAPE, np.float16).tobytes()
    for i in range(files):
        row = {"image": [f"{i}.jpg"], "features": [blob], "dtype": ["float16"], "shape": [[64, 2048]], "error": [None]}
        pq.write_table(pa.table(row, schema=SCHEMA), folder / f"part-{i:05d}.parquet")
    listed = [{"file": f"part-{i:05d}.parquet", "rows": 1} for i in range(files)]
    (folder / FILE_LIST).write_text(json.dumps({"files": listed}))


def test_a_read_of_the_features_starts_no_more_footer_readers_than_it_keeps_busy(
    ray_local, synthetic_features: Path, tmp_path: Path
) -> None:
    # Ray Data's Parquet reader starts a pool of footer-reading actors for every read, 32 by
    # default: 32 worker processes each time a training dataset is read again. capray's jobs make
    # it 2, and a folder whose footers one reader reads in one call (10 files) starts 1.
    assert os.environ[FOOTER_ACTORS] == "2"
    shared = synthetic_features / "features"
    assert len(read_file_list(str(shared), None)["files"]) <= 10
    assert _footer_readers_of_a_read(shared) == 1
    _stand_in_features(tmp_path / "many", 25)
    assert _footer_readers_of_a_read(tmp_path / "many") == 2  # 3 calls of 10 files, 2 readers
    assert os.environ[FOOTER_ACTORS] == "2"  # as configured again after each read
