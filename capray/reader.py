"""Reading a shard in a worker: its rows streamed in batches, whatever the input kind.

`read_shard` yields pyarrow tables of `inputs.KEY` (the row's key), `inputs.URI` or `inputs.DATA`
(the image as a URI to read or as bytes), then the input's own columns: from a listing chunk, a
manifest (CSV or Parquet, its row groups), a WebDataset tar (members streamed, never the whole
file) or Parquet with image bytes. Planning (which shards exist) is `capray.inputs`, in the driver.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from capray import storage
from capray.inputs import CSV_PARSE, DATA, KEY, URI, Shard, csv_names, unreadable_csv
from capray.listing import stem, suffixes

if TYPE_CHECKING:
    from capray.schema import Config


def _resolve(images: pa.Array, base: str) -> pa.Array:
    images = pc.utf8_trim_whitespace(pc.fill_null(images, ""))
    if pc.all(pc.match_substring_regex(images, "^(/|" + "|".join(storage.STORES) + ")")).as_py():
        return images  # URIs and absolute paths: nothing to resolve, no Python loop per row
    return pa.array([storage.resolve(name, base) for name in images.to_pylist()], pa.string())


def _table_rows(table: pa.Table, base: str) -> pa.Table:
    """A manifest batch -> key, uri and every other column passed through."""
    images = _resolve(table[KEY].cast(pa.string()), base)
    rest = table.drop_columns([KEY])
    return pa.Table.from_arrays([images, images, *rest.columns], names=[KEY, URI, *rest.column_names])


def _bytes_rows(table: pa.Table, shard: Shard, cfg: Config, first_row: int) -> pa.Table:
    col, key = cfg.inputs.bytes_column, cfg.inputs.key_column
    if key in table.column_names:
        keys = table[key].cast(pa.string())
    else:  # no key column: the row's position in the file
        keys = pa.array([f"{stem(shard.uri)}/{first_row + i}" for i in range(table.num_rows)], pa.string())
    rest = table.drop_columns([c for c in (col, key) if c in table.column_names])  # the key is the row's `image`
    return pa.Table.from_arrays([keys, table[col], *rest.columns], names=[KEY, DATA, *rest.column_names])


def _tar_samples(shard: Shard, cfg: Config) -> Iterator[dict[str, Any]]:
    """img2dataset's layout: consecutive members `<key>.<ext>` per sample; one image, optional
    `.txt` (-> caption) and `.json` (-> json). A truncated tar ends with an error row."""
    fs, path = storage.filesystem(shard.uri, cfg.storage)
    exts = suffixes(cfg.inputs.extensions)
    sample: dict[str, Any] = {}
    last = "?"
    with fs.open_input_stream(path) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    last = member.name
                    base, _, ext = member.name.rpartition(".")
                    if sample and sample["key"] != base:
                        yield sample
                        sample = {}
                    sample.setdefault("key", base)
                    stream = tar.extractfile(member)
                    assert stream is not None  # a regular file (checked above) always has one
                    data = stream.read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name}: {len(data)} of {member.size} bytes")
                    if f".{ext.lower()}" in exts:
                        sample["data"] = data
                    elif ext.lower() == "txt":
                        sample["caption"] = data.decode("utf-8", "replace").strip()
                    elif ext.lower() == "json":
                        sample["json"] = data.decode("utf-8", "replace")
        except (tarfile.TarError, EOFError, OSError) as e:
            if sample.get("key") == last.rpartition(".")[0]:
                sample.pop("data", None)
            broken = sample or {"key": last.rpartition(".")[0] or last}
            broken["error"] = f"truncated or corrupt tar {shard.uri} at member {last}: {type(e).__name__}: {e}"
            yield broken
            return
    if sample:
        yield sample


def _tar_batches(shard: Shard, cfg: Config, batch_rows: int) -> Iterator[pa.Table]:
    prefix = stem(shard.uri)
    schema = pa.schema(
        [
            (KEY, pa.string()),
            (DATA, pa.binary()),
            ("caption", pa.string()),
            ("json", pa.string()),
            ("_error", pa.string()),
        ]
    )
    buf: list[dict[str, Any]] = []

    def table() -> pa.Table:
        rows = {
            KEY: [f"{prefix}/{s['key']}" for s in buf],
            DATA: [s.get("data") for s in buf],
            "caption": [s.get("caption") for s in buf],
            "json": [s.get("json") for s in buf],
            "_error": [
                s.get("error") or (None if "data" in s else "no image member with one of inputs.extensions")
                for s in buf
            ],
        }
        return pa.table(rows, schema=schema)

    for s in _tar_samples(shard, cfg):
        buf.append(s)
        if len(buf) >= batch_rows:
            yield table()
            buf = []
    if buf:
        yield table()


def read_shard(shard: Shard, cfg: Config, batch_rows: int) -> Iterator[pa.Table]:
    """Stream a shard as tables of at most `batch_rows` rows: `image` (key), `_uri` or `_data`,
    optionally `_error` (the row cannot be read at all), then the pass-through columns."""
    if shard.kind == "webdataset":
        yield from _tar_batches(shard, cfg, batch_rows)
        return
    fs, path = storage.filesystem(shard.uri, cfg.storage)
    if shard.kind == "csv":
        try:
            with fs.open_input_file(path) as f:
                # Every column as text: types stay the same from one batch (and shard) to the next.
                names = csv_names(f)
            with fs.open_input_file(path) as f:
                table = pacsv.read_csv(
                    f,
                    parse_options=CSV_PARSE,
                    convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
                )
        except pa.ArrowInvalid as e:  # past the block the plan read
            raise unreadable_csv(shard.uri, e) from None
        for batch in table.to_batches(batch_rows):
            yield _table_rows(pa.Table.from_batches([batch]), shard.base)
        return
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups = list(shard.row_groups) or list(range(pf.num_row_groups))
        first = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
            table = pa.Table.from_batches([batch])
            if shard.kind == "parquet_bytes":
                yield _bytes_rows(table, shard, cfg, first)
            else:
                yield _table_rows(table, shard.base if shard.kind == "manifest" else "")
            first += table.num_rows
