"""Unit tests: the atomic Parquet sink of the image jobs, called as a Ray write task calls it (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray.parquet import AtomicParquetSink, part_name, read_columns

SCHEMA = pa.schema([("image", pa.string()), ("caption", pa.string()), ("log_prob", pa.float32())])


def _rows(*images: str) -> pd.DataFrame:
    return pd.DataFrame({"image": list(images), "log_prob": [-1.5] * len(images), "caption": ["a cat"] * len(images)})


def test_one_file_per_task_with_the_schema_named_by_its_keys(tmp_path: Path) -> None:
    sink = AtomicParquetSink(str(tmp_path / "out"), SCHEMA)
    # A task's blocks arrive as pandas or Arrow, columns in any order.
    written = sink.write([_rows("a.jpg", "b.jpg"), pa.Table.from_pandas(_rows("c.jpg"), preserve_index=False)], None)
    assert written == 3
    files = os.listdir(tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / files[0])
    assert files == [part_name(table)] and table.schema.equals(SCHEMA)
    assert table["image"].to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_retried_task_replaces_its_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    sink = AtomicParquetSink(str(tmp_path / "out"), SCHEMA)
    sink.write([_rows("a.jpg", "b.jpg")], None)
    sink.write([_rows("a.jpg", "b.jpg")], None)  # Ray re-ran the task: same rows, same name
    sink.write([_rows("c.jpg")], None)
    assert len(os.listdir(tmp_path / "out")) == 2  # no hidden .tmp left behind either
    assert sorted(read_columns(str(tmp_path / "out"), ["image"])["image"].to_pylist()) == ["a.jpg", "b.jpg", "c.jpg"]


def test_empty_blocks_write_no_file(tmp_path: Path) -> None:
    sink = AtomicParquetSink(str(tmp_path / "out"), SCHEMA)
    assert sink.write([_rows(), pa.table({"image": pa.array([], pa.string())})], None) == 0
    assert not (tmp_path / "out").exists()


def test_rows_that_do_not_fit_the_schema_are_refused(tmp_path: Path) -> None:
    sink = AtomicParquetSink(str(tmp_path / "out"), SCHEMA)
    bad = _rows("a.jpg").assign(log_prob=["not a number"])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        sink.write([bad], None)
    with pytest.raises(KeyError):
        sink.write([_rows("a.jpg").drop(columns="caption")], None)
    assert not (tmp_path / "out").exists()


def test_read_columns_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    table = read_columns(str(tmp_path / "nothing"), ["image", "error"])
    assert table.num_rows == 0 and table.column_names == ["image", "error"]
