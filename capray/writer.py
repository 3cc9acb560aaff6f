"""One output file per shard, visible only when complete (local: a rename; object storage: one upload)."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage

if TYPE_CHECKING:
    pass

# Rows are buffered into Parquet row groups of about this size (a model batch each would make
# thousands of tiny row groups per file): 64 MB of features, or 10,000 caption rows.
ROW_GROUP_BYTES = 64 << 20


ROW_GROUP_ROWS = 10_000


class ShardWriter:
    """Streams tables into one Parquet file that becomes visible only when complete.

    Row groups are encoded and compressed in a background thread while the caller computes the
    next rows (one in flight: at most two row groups of memory), so the model does not stop for
    the codec at every row group.
    """

    def __init__(self, uri: str, storage_cfg: Any, compression: str = "snappy", metadata: dict[str, str] | None = None):
        self.uri, self.storage_cfg, self.compression = uri, storage_cfg, compression
        self.writer: pq.ParquetWriter | None = None
        self.metadata = metadata or {}
        self.buffer: list[pa.Table] = []
        self.buffered_bytes = self.buffered_rows = 0
        self.codec = ThreadPoolExecutor(1, thread_name_prefix="parquet")  # encodes and compresses row groups
        self.in_flight: Any = None
        # Seconds the caller spent in this writer (buffering, waiting for the codec, closing), and
        # in the upload of the finished file: the shard's stats (capray.progress).
        self.write_s = self.upload_s = 0.0
        if storage.is_remote(uri):
            fd, self.tmp = tempfile.mkstemp(suffix=".parquet")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(uri), f".{os.path.basename(uri)}.{uuid.uuid4().hex}.tmp")

    def write(self, table: pa.Table) -> None:
        """Append rows (the first table fixes the file's schema)."""
        t0 = time.perf_counter()
        try:
            self._write(table)
        finally:
            self.write_s += time.perf_counter() - t0

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(
                self.tmp, table.schema.with_metadata(self.metadata), compression=self.compression
            )
        if not table.schema.equals(self.writer.schema):
            table = table.select(self.writer.schema.names).cast(self.writer.schema)
        self.buffer.append(table)
        self.buffered_bytes += table.nbytes
        self.buffered_rows += table.num_rows
        if self.buffered_bytes >= ROW_GROUP_BYTES or self.buffered_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._wait()  # the previous row group's error, if any, surfaces here
        if self.buffer:
            assert self.writer is not None  # made by the first write (or publish) before any flush
            self.in_flight = self.codec.submit(self.writer.write_table, pa.concat_tables(self.buffer))
            self.buffer = []
            self.buffered_bytes = self.buffered_rows = 0

    def _wait(self) -> None:
        if self.in_flight is not None:
            done, self.in_flight = self.in_flight, None
            done.result()

    def publish(self, empty_schema: pa.Schema, footer: Callable[[], dict[str, str]] | None = None) -> None:
        """Close the file and make it appear under its final name (object storage: one upload, visible when done).
        `footer()`, called just before the file is closed, gives key-value metadata for its footer."""
        t0 = time.perf_counter()
        if self.writer is None:  # an empty shard still gets its file: it is done
            self.writer = pq.ParquetWriter(
                self.tmp, empty_schema.with_metadata(self.metadata), compression=self.compression
            )
        self._flush()
        self._wait()
        self.codec.shutdown()
        self.write_s += time.perf_counter() - t0
        if footer is not None:
            self.writer.add_key_value_metadata(footer())
        self.writer.close()
        t0 = time.perf_counter()
        try:
            if storage.is_remote(self.uri):
                storage.upload_file(self.tmp, self.uri, self.storage_cfg)
            else:
                os.replace(self.tmp, self.uri)
        finally:
            self.upload_s = time.perf_counter() - t0
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def discard(self) -> None:
        """Drop the partial file after an error."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 (the error that matters is the one being handled)
            pass
        self.codec.shutdown()
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
