"""Job inputs -> shards: the unit of work, of output files and of resume for the image jobs.

An input is a folder or s3:// prefix of image files, a manifest (.csv/.parquet with an `image`
column; a file, a folder or a glob of them), WebDataset tar shards (img2dataset's layout), or
Parquet files with image bytes (img2dataset's `output_format=parquet`). Each becomes a list of
`Shard`s with stable ids; the driver holds that list (O(shards)) and never one object per image.
A worker reads its shard with `read_shard`, streaming, in batches of rows.

Listing a folder/prefix of images is itself O(images) work: it runs once, in Ray tasks (one per
group of sub-folders), which write the listing as Parquet shards under
`<work_dir>/inputs/<input id>/`, with `_plan.json` written last. Re-runs read `_plan.json` and so
keep the same shards (and skip the ones already done); delete that folder to list again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from capray import storage

# The columns every reader yields before the pass-through ones: the row's key (a URI, or
# `<shard>/<key>` inside a tar) and the image itself as a URI to read or as bytes.
KEY, URI, DATA = "image", "_uri", "_data"
MANIFEST_SUFFIXES = (".csv", ".parquet")
# A CSV file larger than this many bytes per `inputs.shard_rows` row (a typical manifest row is
# 50-150 bytes) is split into Parquet shards once, by a Ray task: otherwise one worker would do a
# whole million-row CSV as a single shard, and its file would appear only at the end.
CSV_SPLIT_BYTES_PER_ROW = 100
_GLOB_CHARS = "*?["


class InputError(RuntimeError):
    """The job cannot start: inputs missing, empty, unreadable or of the wrong shape."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file of the input (or a range of its Parquet row groups)."""

    id: str  # stable across runs: names the output file `<id>.parquet`
    kind: str  # listing | manifest | csv | webdataset | parquet_bytes
    uri: str
    row_groups: tuple[int, ...] = ()  # Parquet kinds: which row groups (empty = all)
    rows: int = -1  # known row count (-1 = unknown until read, e.g. a tar)
    base: str = ""  # manifests: folder that relative image paths are resolved against

    def to_row(self) -> dict[str, Any]:
        """A plain dict row for `ray.data.from_items`."""
        d = asdict(self)
        d["row_groups"] = list(self.row_groups)
        return d

    @staticmethod
    def from_row(row: dict[str, Any]) -> "Shard":
        """Inverse of `to_row` (Ray hands back numpy arrays for lists)."""
        return Shard(row["id"], row["kind"], row["uri"], tuple(int(g) for g in row["row_groups"]), int(row["rows"]), row["base"])


@dataclass
class Plan:
    """What a job will read: its shards, and what kind of input they came from."""

    kind: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def rows(self) -> int | None:
        """Total rows, when every shard's count is known (not for tars)."""
        return None if any(s.rows < 0 for s in self.shards) else sum(s.rows for s in self.shards)


def _digest(*parts: Any) -> str:
    return hashlib.sha1("\n".join(map(str, parts)).encode("utf-8")).hexdigest()[:10]


def _stem(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".parquet", ".csv", ".tar"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe[:40] or "shard"


def suffixes(extensions: Any) -> tuple[str, ...]:
    """`[jpg, .PNG]` -> (".jpg", ".png")."""
    return tuple(f".{str(e).lower().lstrip('.')}" for e in extensions)


def is_image(name: str, cfg: Any) -> bool:
    """Whether a listed file is an image to process (`inputs.extensions`, `inputs.glob`)."""
    base = posixpath.basename(name)
    if base.startswith(".") or not base.lower().endswith(suffixes(cfg.inputs.extensions)):
        return False
    return not cfg.inputs.glob or fnmatch.fnmatch(base, cfg.inputs.glob)


# --- listing: streamed, so a task's memory does not grow with the folder -------------------


def walk(uri: str, storage_cfg: Any = None, recursive: bool = True) -> Iterator[tuple[str, bool]]:
    """(uri, is_folder) under a folder/prefix, streamed in sorted order. Recursive: files only."""
    if storage.is_remote(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        prefix = key.rstrip("/") + "/" if key else ""
        args = {"Bucket": bucket, "Prefix": prefix, **({} if recursive else {"Delimiter": "/"})}
        for page in storage.listing_client(storage_cfg).get_paginator("list_objects_v2").paginate(**args):
            for d in page.get("CommonPrefixes", ()):
                yield f"s3://{bucket}/{d['Prefix'].rstrip('/')}", True
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):  # folder markers
                    yield f"s3://{bucket}/{obj['Key']}", False
        return
    if recursive:
        for root, dirs, files in os.walk(uri):
            dirs.sort()
            for name in sorted(files):
                yield os.path.join(root, name), False
        return
    with os.scandir(uri) as entries:
        for name, is_dir in sorted((e.name, e.is_dir()) for e in entries):
            yield os.path.join(uri, name), is_dir


def _write_listing(uris: list[str], uri: str, storage_cfg: Any) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({KEY: pa.array(uris, pa.string())}), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)


def list_group(roots: list[str], recursive: bool, out_dir: str, group: int, cfg: Any) -> dict[str, Any]:
    """Ray task: list `roots`, write the image URIs as listing shards of `inputs.shard_rows`
    under `out_dir`; returns [(file, rows)] and, for a top-level (non-recursive) listing, the
    sub-folders found. Memory: one shard of URIs, however many files there are."""
    shards, folders, buf = [], [], []

    def flush() -> None:
        name = storage.join(out_dir, f"list-{group:05d}-{len(shards):05d}.parquet")
        _write_listing(buf, name, cfg.storage)
        shards.append((name, len(buf)))
        buf.clear()

    for root in roots:
        for path, is_dir in walk(root, cfg.storage, recursive):
            if is_dir:
                folders.append(path)
            elif is_image(path, cfg):
                buf.append(path)
                if len(buf) >= cfg.inputs.shard_rows:
                    flush()
    if buf:
        flush()
    return {"shards": shards, "folders": folders}


def _list_images(cfg: Any, uri: str, cache_dir: str) -> Plan:
    """Plan of a folder/prefix of images: listed once by Ray tasks, reused by re-runs."""
    import ray

    out_dir = storage.join(cache_dir, f"{_stem(uri)}-{_digest(uri, list(cfg.inputs.extensions), cfg.inputs.glob, cfg.inputs.shard_rows)}")
    plan_uri = storage.join(out_dir, "_plan.json")
    if storage.exists(plan_uri, cfg.storage):
        saved = json.loads(storage.read_bytes(plan_uri, cfg.storage))
        return Plan("files", [Shard(s["id"], "listing", s["uri"], rows=s["rows"]) for s in saved["shards"]])
    task = ray.remote(num_cpus=0.5)(list_group)
    top = ray.get(task.remote([uri], False, out_dir, 0, cfg))
    folders = top["folders"]
    # Sub-folders are listed in parallel, in contiguous groups (their order is the listing's).
    n_groups = min(len(folders), 64)
    groups = [folders[i * len(folders) // n_groups:(i + 1) * len(folders) // n_groups] for i in range(n_groups)]
    results = [top] + ray.get([task.remote(g, True, out_dir, i + 1, cfg) for i, g in enumerate(groups)])
    files = [(f, n) for r in results for f, n in r["shards"]]
    shards = [Shard(f"{posixpath.basename(f)[: -len('.parquet')]}-{_digest(out_dir)}", "listing", f, rows=n) for f, n in files]
    if not shards:
        exts = ", ".join(cfg.inputs.extensions)
        raise InputError(f"no images under {uri} (files ending in {exts}" + (f", matching {cfg.inputs.glob!r}" if cfg.inputs.glob else "") + ")")
    saved = {"input": uri, "shards": [{"id": s.id, "uri": s.uri, "rows": s.rows} for s in shards]}
    storage.write_bytes(plan_uri, json.dumps(saved).encode(), cfg.storage)
    return Plan("files", shards)


def images_plan(images: list[str], cache_dir: str, cfg: Any, name: str) -> Plan:
    """Plan of an explicit image list the driver already holds (the training split), written once."""
    digest = _digest(cfg.inputs.shard_rows, len(images), *images)
    out_dir = storage.join(cache_dir, f"{name}-{digest}")
    n = cfg.inputs.shard_rows
    shards = []
    for k in range(0, len(images), n):
        uri = storage.join(out_dir, f"list-{k // n:05d}.parquet")
        if not storage.exists(uri, cfg.storage):
            _write_listing(images[k:k + n], uri, cfg.storage)
        shards.append(Shard(f"{name}-{k // n:05d}-{digest}", "listing", uri, rows=len(images[k:k + n])))
    return Plan("files", shards)


# --- manifests, tars and Parquet with bytes: one shard per file or per group of row groups ----


def _parquet_shards(uri: str, cfg: Any, kind: str) -> list[Shard]:
    fs, path = storage.filesystem(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    groups: list[list[int]] = []
    rows = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if groups and rows + n <= cfg.inputs.shard_rows:
            groups[-1].append(g)
            rows += n
        else:
            groups.append([g])
            rows = n
    base = posixpath.dirname(uri) if storage.is_remote(uri) else os.path.dirname(uri)
    return [
        Shard(f"{_stem(uri)}-{g[0]:05d}-{_digest(uri, g)}", kind, uri, tuple(g),
              sum(meta.row_group(i).num_rows for i in g), base)
        for g in groups
    ]


def _schema(uri: str, cfg: Any) -> pa.Schema:
    fs, path = storage.filesystem(uri, cfg.storage)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).schema_arrow
        with fs.open_input_stream(path) as f:
            return pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{uri}: not a readable {'Parquet' if uri.lower().endswith('.parquet') else 'CSV'} file ({e})") from None


def _file_kind(uri: str, cfg: Any) -> str:
    """manifest | csv | parquet_bytes for one .csv/.parquet file, from its schema; errors name the file."""
    schema = _schema(uri, cfg)
    col = cfg.inputs.bytes_column
    if uri.lower().endswith(".parquet") and col in schema.names and KEY not in schema.names:
        typ = schema.field(col).type
        if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise InputError(f"{uri}: column {col!r} (inputs.bytes_column) is {typ}, expected binary image bytes")
        return "parquet_bytes"
    if KEY not in schema.names:
        raise InputError(
            f"{uri}: no {KEY!r} column (found: {', '.join(schema.names)}); a manifest needs an image path/URI "
            f"column named {KEY!r}, Parquet with image bytes a binary column {col!r} (inputs.bytes_column)"
        )
    return "manifest" if uri.lower().endswith(".parquet") else "csv"


def _glob(uri: str, cfg: Any) -> list[str]:
    parent, pattern = uri.rsplit("/", 1)
    if any(c in parent for c in _GLOB_CHARS):
        raise InputError(f"{uri}: only the last part of an input path may be a glob")
    return sorted(u for u, is_dir in walk(parent, cfg.storage, recursive=False)
                  if not is_dir and fnmatch.fnmatch(posixpath.basename(u), pattern))


def _expand(uri: str, cfg: Any, wanted: tuple[str, ...]) -> list[str]:
    """The files a manifest/tar input names: one file, a glob, or a folder (recursively)."""
    if any(c in uri for c in _GLOB_CHARS):
        return [u for u in _glob(uri, cfg) if u.lower().endswith(wanted)]
    if uri.lower().endswith(wanted):
        return [uri]
    return [u for u, _ in walk(uri, cfg.storage, recursive=True)
            if u.lower().endswith(wanted) and not posixpath.basename(u).startswith(("_", "."))]


def _detect(uri: str, cfg: Any) -> str:
    """files | manifest | webdataset: from the name, a glob's matches, or a folder's first entries."""
    if cfg.inputs.format != "auto":
        return cfg.inputs.format
    if any(c in uri for c in _GLOB_CHARS):
        names = [u.lower() for u in _glob(uri, cfg)]
        if not names:
            raise InputError(f"no file matches {uri}")
        if all(n.endswith(".tar") for n in names):
            return "webdataset"
        if all(n.endswith(MANIFEST_SUFFIXES) for n in names):
            return "manifest"
        raise InputError(f"{uri}: a glob input selects manifests or tars; for image files give the folder and inputs.glob")
    name = uri.lower().rsplit("/", 1)[-1]
    if name.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if name.endswith(".tar"):
        return "webdataset"
    kinds = set()
    for seen, (path, is_dir) in enumerate(walk(uri, cfg.storage, recursive=False)):
        if seen >= 1000:  # a peek, not a listing
            break
        low = path.lower()
        if not is_dir:
            kinds.add("tar" if low.endswith(".tar") else "table" if low.endswith(MANIFEST_SUFFIXES) else "image" if is_image(path, cfg) else "")
    if "tar" in kinds:
        return "webdataset"
    if "table" in kinds and "image" not in kinds:
        return "manifest"
    return "files"


def plan(cfg: Any, uri: str, cache_dir: str) -> Plan:
    """The shards of input `uri` (any kind above); fails with InputError before any work.
    `cache_dir` (`<work_dir>/inputs`) keeps the listings of image folders."""
    try:
        if not any(c in uri for c in _GLOB_CHARS) and not storage.exists(uri, cfg.storage):
            raise InputError(f"input not found: {uri}")
        kind = _detect(uri, cfg)
        if kind == "files":
            return _list_images(cfg, uri, cache_dir)
        if kind == "webdataset":
            tars = _expand(uri, cfg, (".tar",))
            if not tars:
                raise InputError(f"no .tar shards under {uri}")
            return Plan("webdataset", [Shard(f"{_stem(t)}-{_digest(t)}", "webdataset", t) for t in tars])
        files = _expand(uri, cfg, MANIFEST_SUFFIXES)
        if not files:
            raise InputError(f"no .csv or .parquet manifest under {uri}")
        kinds = list(ThreadPoolExecutor(16).map(lambda f: _file_kind(f, cfg), files))
        if len(set(k == "parquet_bytes" for k in kinds)) > 1:
            raise InputError(f"{uri} mixes manifests and Parquet files with image bytes: give one kind per job")

        big = [f for f, k in zip(files, kinds) if k == "csv" and _size(f, cfg) > CSV_SPLIT_BYTES_PER_ROW * cfg.inputs.shard_rows]
        split = _split_csvs(big, cfg, cache_dir) if big else {}

        def shards_of(f: str, k: str) -> list[Shard]:
            if f in split:
                return split[f]
            if k == "csv":
                base = posixpath.dirname(f) if storage.is_remote(f) else os.path.dirname(f)
                return [Shard(f"{_stem(f)}-{_digest(f)}", "csv", f, base=base)]
            return _parquet_shards(f, cfg, k)

        shards = [s for group in ThreadPoolExecutor(16).map(shards_of, files, kinds) for s in group]
        return Plan("parquet_bytes" if kinds[0] == "parquet_bytes" else "manifest", shards)
    except OSError as e:  # unreachable endpoint, bad credentials, no permission...
        raise InputError(f"cannot list {uri}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("botocore"):
            raise InputError(f"cannot list {uri}: {e}") from None
        raise


def split_csv(uri: str, out_dir: str, cfg: Any) -> list[tuple[str, int]]:
    """Ray task: a large CSV manifest -> Parquet files of `inputs.shard_rows` rows (text columns),
    streamed; returns [(file, rows)]."""
    fs, path = storage.filesystem(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
    n, out, buf = cfg.inputs.shard_rows, [], []

    def flush(rows: list) -> None:
        name = storage.join(out_dir, f"part-{len(out):05d}.parquet")
        table = pa.Table.from_batches(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(name, sink.getvalue().to_pybytes(), cfg.storage)
        out.append((name, table.num_rows))

    with fs.open_input_stream(path) as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=4 << 20),
                                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names}))
        pending = 0
        for batch in reader:
            while batch.num_rows:
                take = min(n - pending, batch.num_rows)
                buf.append(batch.slice(0, take))
                batch, pending = batch.slice(take), pending + take
                if pending == n:
                    flush(buf)
                    buf, pending = [], 0
    if buf:
        flush(buf)
    return out


def _split_csvs(csvs: list[str], cfg: Any, cache_dir: str) -> dict[str, list[Shard]]:
    """Shards of the large CSV files, split once (cached under `cache_dir` like listings)."""
    import ray

    result: dict[str, list[Shard]] = {}
    pending = {}
    for uri in csvs:
        base = posixpath.dirname(uri) if storage.is_remote(uri) else os.path.dirname(uri)
        size = _size(uri, cfg)
        # Ids from the file's size too: a changed manifest is new work, never "already done".
        digest = _digest(uri, size, cfg.inputs.shard_rows)
        out_dir = storage.join(cache_dir, f"{_stem(uri)}-{digest}")
        plan_uri = storage.join(out_dir, "_plan.json")
        if storage.exists(plan_uri, cfg.storage):
            files = json.loads(storage.read_bytes(plan_uri, cfg.storage))["files"]
            result[uri] = [Shard(f"{_stem(uri)}-{k:05d}-{digest}", "manifest", f, rows=r, base=base) for k, (f, r) in enumerate(files)]
        else:
            pending[uri] = (ray.remote(num_cpus=0.5)(split_csv).remote(uri, out_dir, cfg), plan_uri, base, digest)
    for uri, (ref, plan_uri, base, digest) in pending.items():
        files = ray.get(ref)
        storage.write_bytes(plan_uri, json.dumps({"input": uri, "files": files}).encode(), cfg.storage)
        result[uri] = [Shard(f"{_stem(uri)}-{k:05d}-{digest}", "manifest", f, rows=r, base=base) for k, (f, r) in enumerate(files)]
    return result


def _size(uri: str, cfg: Any) -> int:
    fs, path = storage.filesystem(uri, cfg.storage)
    return fs.get_file_info(path).size or 0


# --- reading one shard, in the worker ---------------------------------------------------------


def _resolve(images: pa.Array, base: str) -> pa.Array:
    images = pc.utf8_trim_whitespace(pc.fill_null(images, ""))
    if pc.all(pc.or_(pc.starts_with(images, "s3://"), pc.starts_with(images, "/"))).as_py():
        return images  # URIs and absolute paths: nothing to resolve, no Python loop per row
    out = []
    for name in images.to_pylist():
        if name and not storage.is_remote(name) and not os.path.isabs(name) and base:
            name = storage.join(base, name)
        out.append(name if not name or storage.is_remote(name) else os.path.abspath(name))
    return pa.array(out, pa.string())


def _table_rows(table: pa.Table, base: str) -> pa.Table:
    """A manifest batch -> key, uri and every other column passed through."""
    images = _resolve(table[KEY].cast(pa.string()), base)
    rest = table.drop_columns([KEY])
    return pa.Table.from_arrays([images, images, *rest.columns], names=[KEY, URI, *rest.column_names])


def _bytes_rows(table: pa.Table, shard: Shard, cfg: Any, first_row: int) -> pa.Table:
    col, key = cfg.inputs.bytes_column, cfg.inputs.key_column
    if key in table.column_names:
        keys = table[key].cast(pa.string())
    else:  # no key column: the row's position in the file
        keys = pa.array([f"{_stem(shard.uri)}/{first_row + i}" for i in range(table.num_rows)], pa.string())
    rest = table.drop_columns([c for c in (col, key) if c in table.column_names])  # the key is the row's `image`
    return pa.Table.from_arrays([keys, table[col], *rest.columns], names=[KEY, DATA, *rest.column_names])


def _tar_samples(shard: Shard, cfg: Any) -> Iterator[dict[str, Any]]:
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
                    data = tar.extractfile(member).read()
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


def _tar_batches(shard: Shard, cfg: Any, batch_rows: int) -> Iterator[pa.Table]:
    prefix = _stem(shard.uri)
    schema = pa.schema([(KEY, pa.string()), (DATA, pa.binary()), ("caption", pa.string()), ("json", pa.string()), ("_error", pa.string())])
    buf: list[dict[str, Any]] = []

    def table() -> pa.Table:
        rows = {
            KEY: [f"{prefix}/{s['key']}" for s in buf],
            DATA: [s.get("data") for s in buf],
            "caption": [s.get("caption") for s in buf],
            "json": [s.get("json") for s in buf],
            "_error": [s.get("error") or (None if "data" in s else "no image member with one of inputs.extensions") for s in buf],
        }
        return pa.table(rows, schema=schema)

    for s in _tar_samples(shard, cfg):
        buf.append(s)
        if len(buf) >= batch_rows:
            yield table()
            buf = []
    if buf:
        yield table()


def read_shard(shard: Shard, cfg: Any, batch_rows: int) -> Iterator[pa.Table]:
    """Stream a shard as tables of at most `batch_rows` rows: `image` (key), `_uri` or `_data`,
    optionally `_error` (the row cannot be read at all), then the pass-through columns."""
    if shard.kind == "webdataset":
        yield from _tar_batches(shard, cfg, batch_rows)
        return
    fs, path = storage.filesystem(shard.uri, cfg.storage)
    if shard.kind == "csv":
        with fs.open_input_file(path) as f:
            # Every column as text: types stay the same from one batch (and shard) to the next.
            names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
        with fs.open_input_file(path) as f:
            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
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
