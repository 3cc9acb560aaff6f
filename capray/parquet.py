"""Parquet outputs of the Ray Data jobs: one file per write task, each appearing atomically.

Ray's own `write_parquet` writes straight to the final file name, so a job killed mid-write
leaves a truncated `.parquet` that readers (and our resume logic) take for data. This sink
writes each file under a hidden temporary name and renames it (local disk) or uploads it in one
request (S3), so a file is either complete or absent and an interrupted job can resume from
exactly the files that exist.

File names come from the rows' keys (the first column, `image`), not a random id: when Ray
re-executes a write task (a node died after the file was stored), the retry writes the same name
and replaces the file instead of adding a second copy of its rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data import Datasink

from capray import storage


class AtomicParquetSink(Datasink):
    """Ray Data sink: `<folder>/part-<hash of the rows' keys>.parquet` files with a fixed schema."""

    def __init__(self, folder: str, schema: pa.Schema, storage_cfg: Any = None, rows_per_file: int = 1000):
        self.folder, self.schema, self.storage_cfg = folder, schema, storage_cfg
        self.rows_per_file = rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        """Ray buffers blocks up to this many rows per file: few, large objects, not one per batch."""
        return self.rows_per_file

    def write(self, blocks: Iterable[Any], ctx: Any) -> int:
        """Write this task's blocks as one file; returns the number of rows written."""
        tables = [pa.Table.from_pandas(b, preserve_index=False) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t.select(self.schema.names).cast(self.schema) for t in tables if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(self.folder, part_name(table)), sink.getvalue().to_pybytes(), self.storage_cfg)
        return table.num_rows

    def get_name(self) -> str:
        """Name shown in Ray Data's progress output."""
        return "AtomicParquet"


def part_name(table: pa.Table) -> str:
    """`part-<sha1 of the first column's values>.parquet`: the same rows always get the same name."""
    keys = "\n".join(str(v) for v in table.column(0).to_pylist())
    return f"part-{hashlib.sha1(keys.encode('utf-8')).hexdigest()[:24]}.parquet"


def read_columns(folder: str, columns: list[str], storage_cfg: Any = None) -> pa.Table:
    """Selected columns of every Parquet file in `folder` (an empty table if there is none)."""
    if not storage.exists(folder, storage_cfg):
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    fs, path = storage.filesystem(folder, storage_cfg)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
