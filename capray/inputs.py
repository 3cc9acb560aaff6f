"""Job inputs -> shards: the unit of work, of output files and of resume for the image jobs.

An input is a folder or object-storage prefix of image files, a manifest (.csv/.parquet with an `image`
column; a file, a folder or a glob of them), WebDataset tar shards (img2dataset's layout), or
Parquet files with image bytes (img2dataset's `output_format=parquet`). Each becomes a list of
`Shard`s; the driver holds that list (O(shards)) and never one object per image. This module
plans, in the driver; a worker reads its shard with `capray.reader.read_shard`, streaming.

A shard's id names what it holds, not where: `<location>.<content digest>`. A folder/prefix is
listed by Ray tasks into content-defined chunks of keys with their versions (capray.listing);
a chunk's location is its key range and its digest covers every key and version in it. A
manifest, tar or Parquet file's shards are located by file (and row groups) and digest the
file's size and ETag/mtime. So an input that changed never passes for done, and capray.shards
can tell which earlier output files a new shard replaces.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capray import listing, storage
from capray.listing import ListingError, digest, is_image, stem, suffixes, walk

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)
# The columns every reader yields before the pass-through ones: the row's key (a URI, or
# `<shard>/<key>` inside a tar) and the image itself as a URI to read or as bytes.
KEY, URI, DATA = "image", "_uri", "_data"
# A listed image's version (`<size>:<ETag or mtime>`), passed through into the output rows: it is
# what a re-run compares to tell an overwritten image from an unchanged one.
VERSION = listing.VERSION
MANIFEST_SUFFIXES = (".csv", ".parquet")
# A CSV file larger than this many bytes per `inputs.shard_rows` row (a typical manifest row is
# 50-150 bytes) is split into Parquet shards once, by a Ray task: otherwise one worker would do a
# whole million-row CSV as a single shard, and its file would appear only at the end.
CSV_SPLIT_BYTES_PER_ROW = 100
_GLOB_CHARS = "*?["


class InputError(RuntimeError):
    """The job cannot start: inputs missing, empty, unreadable or of the wrong shape."""


def unreadable_csv(uri: str, e: Exception) -> InputError:
    """The error for a CSV manifest that pyarrow cannot parse or convert to text (bytes that are
    not UTF-8, a row with another number of columns), from the plan, the split or a reader."""
    return InputError(f"{uri}: not a readable CSV file ({e})")


# Quoted values may hold newlines (a caption over two lines). Without this pyarrow cuts its blocks
# at every newline, and a value across a block boundary failed the whole file ("parser got out of
# sync with chunker"); on a 79 MB manifest it read no slower.
CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def csv_names(f: Any) -> list[str]:
    """A CSV file's column names (its header), from its first block."""
    return pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16), parse_options=CSV_PARSE).schema.names


@dataclass(frozen=True)
class Shard:
    """One unit of work: a chunk of a listing, a file of the input, or a range of its row groups."""

    id: str  # `<location>.<content digest>`: names the output file `<id>.parquet`
    kind: str  # listing | manifest | csv | webdataset | parquet_bytes
    uri: str  # the file the worker reads (a listing chunk, a manifest, a tar...)
    row_groups: tuple[int, ...] = ()  # Parquet kinds: which row groups (empty = all)
    rows: int = -1  # known row count (-1 = unknown until read, e.g. a tar)
    base: str = ""  # manifests: folder that relative image paths are resolved against
    source: str = ""  # the input file the shard comes from ("" for a listing chunk)
    lo: str = ""  # listings: the key range [lo, hi) the shard covers ("" = open)
    hi: str = ""
    sources: tuple[str, ...] = ()  # earlier output files whose rows it may copy (capray.shards)

    @property
    def location(self) -> str:
        """The id without its content digest: the same for every version of this part of the input."""
        return self.id.rpartition(".")[0]

    def to_row(self) -> dict[str, Any]:
        """A plain dict row for `ray.data.from_items`."""
        d = asdict(self)
        d["row_groups"] = list(self.row_groups)
        d["sources"] = list(self.sources)
        return d

    @staticmethod
    def from_row(row: dict[str, Any]) -> Shard:
        """Inverse of `to_row` (Ray hands back numpy arrays for lists)."""
        return Shard(
            row["id"],
            row["kind"],
            row["uri"],
            tuple(int(g) for g in row["row_groups"]),
            int(row["rows"]),
            row["base"],
            row["source"],
            row["lo"],
            row["hi"],
            tuple(str(s) for s in row["sources"]),
        )


@dataclass
class Plan:
    """What a job will read: its shards, what kind of input they came from, and for a listed
    folder/prefix how the listing was obtained (`listing`: taken_at, reused, changes)."""

    kind: str
    shards: list[Shard] = field(default_factory=list)
    input: str = ""
    listing: dict[str, Any] | None = None
    left_out: list[str] = field(default_factory=list)  # the job's own folders inside the input

    @property
    def rows(self) -> int | None:
        """Total rows, when every shard's count is known (not for tars)."""
        return None if any(s.rows < 0 for s in self.shards) else sum(s.rows for s in self.shards)


def _listing_shards(chunks: list[dict[str, Any]], cfg: Config) -> list[Shard]:
    # With inputs.removed=keep a shard's file also holds rows of removed images, so its content
    # differs: switching the option rewrites (copies) the shards instead of taking them for done.
    keep = cfg.inputs.removed == "keep"
    return [
        Shard(
            f"list-{digest(lo)}.{digest(c['digest'], 'keep') if keep else c['digest']}",
            "listing",
            c["file"],
            rows=c["rows"],
            lo=lo,
            hi=hi,
        )
        for c, (lo, hi) in zip(chunks, listing.ranges(chunks))
    ]


def _list_images(cfg: Config, uri: str, cache_dir: str, own: list[str]) -> Plan:
    """Plan of a folder/prefix of images: listed by Ray tasks without the job's own folders `own`
    (or the saved listing reused, with inputs.relist=false), compared with the listing before it."""
    try:
        current, before, reused = listing.obtain(cfg, uri, cache_dir, own)
    except ListingError as e:
        raise InputError(str(e)) from None
    if not current.chunks:
        exts = ", ".join(cfg.inputs.extensions)
        raise InputError(
            f"no images under {uri} (files ending in {exts}"
            + (f", matching {cfg.inputs.glob!r}" if cfg.inputs.glob else "")
            + ")"
            + (f"; other files: {listing.passed_summary(current.passed_over)}" if current.passed_over else "")
        )
    changes = None
    if before is not None:
        try:
            changes = listing.diff(current, before, cfg.storage)
        except Exception as e:  # noqa: BLE001 (the counts only inform; a deleted old listing must not stop the job)
            log.warning("could not compare the listing of %s with the one before it: %s", uri, e)
    info = {
        "taken_at": current.taken_at,
        "reused": reused,
        "changes": changes,
        "before_taken_at": before.taken_at if before is not None else None,
        "passed_over": current.passed_over,
    }
    return Plan("files", _listing_shards(current.chunks, cfg), uri, info, current.left_out)


def _chunked_once(out_dir: str, what: str, cfg: Config, make: Any) -> Plan:
    """The chunks saved under `out_dir`, or `make()`'s, saved there (a content-addressed folder)."""
    if storage.exists(storage.join(out_dir, listing.LISTING), cfg.storage):
        chunks = listing.load(out_dir, cfg.storage).chunks
    else:
        chunks = make()
        listing.save(what, listing.Listing(out_dir, 0.0, chunks), cfg.storage)
    return Plan("files", _listing_shards(chunks, cfg), what)


def images_plan(images: list[str], cache_dir: str, cfg: Config, name: str) -> Plan:
    """Plan of an explicit image list the caller already holds (the Python API), chunked like a
    listing (no versions: the images are keyed by name), written once per distinct list."""
    images = sorted(set(images))
    out_dir = storage.join(cache_dir, f"{name}-{digest(cfg.inputs.shard_rows, len(images), *images)}")
    return _chunked_once(out_dir, name, cfg, lambda: listing.chunk_list(images, out_dir, cfg))


def names_plan(table_uri: str, column: str, cache_dir: str, cfg: Config, name: str) -> Plan:
    """Plan of the distinct values of a table's column (the split's images), chunked like a
    listing by a Ray task (the driver never holds the names); made again when the table changes."""
    import ray

    size, version = listing.stat(table_uri, cfg.storage)
    out_dir = storage.join(cache_dir, f"{name}-{digest(table_uri, size, version, cfg.inputs.shard_rows)}")
    task = ray.remote(num_cpus=0.5)(listing.chunk_names)
    return _chunked_once(out_dir, name, cfg, lambda: ray.get(task.remote(table_uri, column, out_dir, cfg)))


# --- manifests, tars and Parquet with bytes: one shard per file or per group of row groups ----


def _parquet_shards(f: listing.Entry, cfg: Config, kind: str) -> list[Shard]:
    fs, path = storage.filesystem(f.uri, cfg.storage)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
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
    return [
        Shard(
            f"{stem(f.uri)}-{digest(f.uri)}-{g[0]:05d}.{digest(f.size, f.version, g)}",
            kind,
            f.uri,
            tuple(g),
            sum(meta.row_group(i).num_rows for i in g),
            storage.dirname(f.uri),
            f.uri,
        )
        for g in groups
    ]


def _schema(uri: str, cfg: Config) -> tuple[pa.Schema, bool]:
    """A .csv/.parquet file's schema, and whether it has any row (from the same read)."""
    fs, path = storage.filesystem(uri, cfg.storage)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                return pf.schema_arrow, pf.metadata.num_rows > 0
        with fs.open_input_stream(path) as f:
            # `image` as text, as the readers take it: bytes that are not UTF-8 fail here, naming
            # the file, not in a worker (within the first block; the readers name the rest).
            csv = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 16),
                parse_options=CSV_PARSE,
                convert_options=pacsv.ConvertOptions(column_types={KEY: pa.string()}),
            )
            try:
                return csv.schema, csv.read_next_batch().num_rows > 0
            except StopIteration:
                return csv.schema, False
    except (pa.ArrowException, OSError) as e:
        if uri.lower().endswith(".parquet"):
            raise InputError(f"{uri}: not a readable Parquet file ({e})") from None
        raise unreadable_csv(uri, e) from None


def _file_kind(uri: str, cfg: Config) -> tuple[str, bool]:
    """manifest | csv | parquet_bytes for one .csv/.parquet file, from its schema, and whether it
    has any row; errors name the file."""
    schema, has_rows = _schema(uri, cfg)
    repeated = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if repeated:
        raise InputError(
            f"{uri}: column(s) {', '.join(map(repr, repeated))} appear more than once; give each its own name"
        )
    col = cfg.inputs.bytes_column
    if uri.lower().endswith(".parquet") and col in schema.names and KEY not in schema.names:
        typ = schema.field(col).type
        if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise InputError(f"{uri}: column {col!r} (inputs.bytes_column) is {typ}, expected binary image bytes")
        key = cfg.inputs.key_column
        if key in schema.names and not _is_text(schema.field(key).type):
            raise InputError(f"{uri}: column {key!r} (inputs.key_column) is {schema.field(key).type}, expected text")
        return "parquet_bytes", has_rows
    if KEY not in schema.names:
        raise InputError(
            f"{uri}: no {KEY!r} column (found: {', '.join(schema.names)}); a manifest needs an image path/URI "
            f"column named {KEY!r}, Parquet with image bytes a binary column {col!r} (inputs.bytes_column)"
        )
    if not _is_text(schema.field(KEY).type):
        raise InputError(
            f"{uri}: column {KEY!r} is {schema.field(KEY).type}, expected text (image paths or URIs); image bytes "
            f"go in a binary column named by inputs.bytes_column (now {col!r}), beside no {KEY!r} column"
        )
    return "manifest" if uri.lower().endswith(".parquet") else "csv", has_rows


def _is_text(typ: pa.DataType) -> bool:
    """A column type the readers turn into names: text, or whole numbers (ids), maybe dictionary-encoded."""
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)


def _glob(uri: str, cfg: Config) -> list[listing.Entry]:
    import fnmatch

    parent, pattern = uri.rsplit("/", 1)
    if any(c in parent for c in _GLOB_CHARS):
        raise InputError(f"{uri}: only the last part of an input path may be a glob")
    return [
        e
        for e in walk(parent, cfg.storage, recursive=False)
        if not e.is_dir and not e.note and fnmatch.fnmatch(posixpath.basename(e.uri), pattern)
    ]


def _expand(uri: str, cfg: Config, wanted: tuple[str, ...], own: list[str]) -> list[listing.Entry]:
    """The files a manifest/tar input names (one file, a glob, or a folder recursively but not
    the job's own folders `own`), each with its size and version."""
    if any(c in uri for c in _GLOB_CHARS):
        return [e for e in _glob(uri, cfg) if e.uri.lower().endswith(wanted)]
    if uri.lower().endswith(wanted):
        return [listing.Entry(uri, False, *listing.stat(uri, cfg.storage))]
    # Not the job's own folders: a caption output inside a folder of Parquet inputs would be read
    # as a manifest of its own images.
    return [
        e
        for e in walk(uri, cfg.storage, recursive=True)
        if e.uri.lower().endswith(wanted)
        and not e.note
        and not posixpath.basename(e.uri).startswith(("_", "."))
        and not listing.is_in(e.uri, own)
    ]


def _detect(uri: str, cfg: Config) -> str:
    """files | manifest | webdataset: from the name, a glob's matches, or a folder's first entries."""
    if cfg.inputs.format != "auto":
        return cfg.inputs.format
    if any(c in uri for c in _GLOB_CHARS):
        names = [e.uri.lower() for e in _glob(uri, cfg)]
        if not names:
            raise InputError(f"no file matches {uri}")
        if all(n.endswith(".tar") for n in names):
            return "webdataset"
        if all(n.endswith(MANIFEST_SUFFIXES) for n in names):
            return "manifest"
        raise InputError(
            f"{uri}: a glob input selects manifests or tars; for image files give the folder and inputs.glob"
        )
    name = uri.lower().rsplit("/", 1)[-1]
    if name.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if name.endswith(".tar"):
        return "webdataset"
    kinds = set()
    for seen, e in enumerate(walk(uri, cfg.storage, recursive=False)):
        if seen >= 1000:  # a peek, not a listing
            break
        low = e.uri.lower()
        if not e.is_dir and not e.note:
            kinds.add(
                "tar"
                if low.endswith(".tar")
                else "table"
                if low.endswith(MANIFEST_SUFFIXES)
                else "image"
                if is_image(e.uri, cfg)
                else ""
            )
    if "tar" in kinds:
        return "webdataset"
    if "table" in kinds and "image" not in kinds:
        return "manifest"
    return "files"


def require(uri: str, cfg: Config) -> None:
    """InputError unless input `uri` exists and, if one file, is of an input kind (a glob is
    expanded by `plan`, which names what it matched). The jobs' preflight runs it before Ray starts."""
    if any(c in uri for c in _GLOB_CHARS):
        return
    fs, path = storage.filesystem(uri, cfg.storage)
    found = fs.get_file_info(path).type
    if found == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    if found != pafs.FileType.File or uri.lower().endswith((*MANIFEST_SUFFIXES, ".tar")):
        return
    # Planned as a folder, such a file would fail with "not a directory" (local) or find no
    # images (object storage).
    if uri.lower().endswith(suffixes(cfg.inputs.extensions)):
        raise InputError(
            f"{uri} is one image file: give the folder it is in (inputs.glob selects files in it) "
            "or a manifest (.csv/.parquet) that lists it"
        )
    raise InputError(
        f"{uri} is a file of no input kind: give a folder or prefix of images, a manifest (.csv or .parquet "
        "with an 'image' column), WebDataset .tar shards, or Parquet with image bytes (docs/inputs.md)"
    )


def plan(cfg: Config, uri: str, cache_dir: str, output: str = "") -> Plan:
    """The shards of input `uri` (any kind above); fails with InputError before any work.
    `cache_dir` (`<work_dir>/inputs`) keeps the listings of image folders and split CSVs; `output`
    is the job's output folder: like the work_dir, left out of an input folder that holds it."""
    try:
        require(uri, cfg)
        kind = _detect(uri, cfg)
        if listing.same_folder(uri, cfg.work_dir):
            raise InputError(
                f"input {uri} is the work_dir too: the job's own files there (features, listings, checkpoints "
                f"and their PNG figures) would be read as input; set work_dir to another folder, or one inside "
                f"it (e.g. work_dir={storage.join(uri, 'capray')})"
            )
        if listing.same_folder(uri, output) and kind != "files":
            raise InputError(
                f"input {uri} is the job's output folder too: the files written there would be read as "
                f"manifests; write the output to another folder, or one inside it ({storage.join(uri, 'captions')})"
            )
        # A folder's inputs are listed without the job's own folders (a glob or one file has none inside).
        own = listing.inside(uri, [cfg.work_dir, output])
        if kind == "files":
            return _list_images(cfg, uri, cache_dir, own)
        if kind == "webdataset":
            tars = _expand(uri, cfg, (".tar",), own)
            if not tars:
                raise InputError(f"no .tar shards under {uri}")
            return Plan(
                "webdataset",
                [
                    Shard(
                        f"{stem(t.uri)}-{digest(t.uri)}.{digest(t.size, t.version)}", "webdataset", t.uri, source=t.uri
                    )
                    for t in tars
                ],
                uri,
                left_out=own,
            )
        files = _expand(uri, cfg, MANIFEST_SUFFIXES, own)
        if not files:
            raise InputError(f"no .csv or .parquet manifest under {uri}")
        kinds, has_rows = zip(*ThreadPoolExecutor(16).map(lambda f: _file_kind(f.uri, cfg), files))
        if not any(has_rows):  # as a folder without images: an error, not a job that does nothing
            raise InputError(
                f"{uri} has no rows: no images to process"
                if len(files) == 1
                else f"no images under {uri}: its {len(files)} .csv/.parquet files have no rows"
            )
        if len(set(k == "parquet_bytes" for k in kinds)) > 1:
            raise InputError(f"{uri} mixes manifests and Parquet files with image bytes: give one kind per job")

        big = [
            f for f, k in zip(files, kinds) if k == "csv" and f.size > CSV_SPLIT_BYTES_PER_ROW * cfg.inputs.shard_rows
        ]
        split = _split_csvs(big, cfg, cache_dir) if big else {}

        def shards_of(f: listing.Entry, k: str) -> list[Shard]:
            if f.uri in split:
                return split[f.uri]
            if k == "csv":
                return [
                    Shard(
                        f"{stem(f.uri)}-{digest(f.uri)}.{digest(f.size, f.version)}",
                        "csv",
                        f.uri,
                        base=storage.dirname(f.uri),
                        source=f.uri,
                    )
                ]
            return _parquet_shards(f, cfg, k)

        shards = [s for group in ThreadPoolExecutor(16).map(shards_of, files, kinds) for s in group]
        return Plan("parquet_bytes" if kinds[0] == "parquet_bytes" else "manifest", shards, uri, left_out=own)
    except Exception as e:
        if storage.is_storage_error(e):  # unreachable endpoint, bad credentials, no permission...
            raise InputError(f"cannot list {uri}: {e}") from None
        raise


def split_csv(uri: str, out_dir: str, cfg: Config) -> list[tuple[str, int]]:
    """Ray task: a large CSV manifest -> Parquet files of `inputs.shard_rows` rows (text columns),
    streamed; returns [(file, rows)]."""
    fs, path = storage.filesystem(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        names = csv_names(f)
    n = cfg.inputs.shard_rows
    out: list[tuple[str, int]] = []
    buf: list[Any] = []

    def flush(rows: list) -> None:
        name = storage.join(out_dir, f"part-{len(out):05d}.parquet")
        table = pa.Table.from_batches(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(name, sink.getvalue().to_pybytes(), cfg.storage)
        out.append((name, table.num_rows))

    try:
        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=4 << 20),
                parse_options=CSV_PARSE,
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names}),
            )
            pending = 0
            for batch in reader:
                while batch.num_rows:
                    take = min(n - pending, batch.num_rows)
                    buf.append(batch.slice(0, take))
                    batch, pending = batch.slice(take), pending + take
                    if pending == n:
                        flush(buf)
                        buf, pending = [], 0
    except pa.ArrowInvalid as e:  # past the block the plan read
        raise unreadable_csv(uri, e) from None
    if buf:
        flush(buf)
    return out


def _split_csvs(csvs: list[listing.Entry], cfg: Config, cache_dir: str) -> dict[str, list[Shard]]:
    """Shards of the large CSV files, split once per version of the file (cached under
    `cache_dir` like listings): a rewritten CSV is split again and none of it passes for done."""
    import json

    import ray

    result: dict[str, list[Shard]] = {}
    pending = {}

    def shards(f: listing.Entry, content: str, files: list[tuple[str, int]]) -> list[Shard]:
        return [
            Shard(
                f"{stem(f.uri)}-{digest(f.uri)}-{k:05d}.{content}",
                "manifest",
                part,
                rows=r,
                base=storage.dirname(f.uri),
                source=f.uri,
            )
            for k, (part, r) in enumerate(files)
        ]

    for f in csvs:
        content = digest(f.size, f.version, cfg.inputs.shard_rows)
        out_dir = storage.join(cache_dir, f"{stem(f.uri)}-{digest(f.uri)}-{content}")
        plan_uri = storage.join(out_dir, "_plan.json")
        if storage.exists(plan_uri, cfg.storage):
            result[f.uri] = shards(f, content, json.loads(storage.read_bytes(plan_uri, cfg.storage))["files"])
        else:
            pending[f.uri] = (f, content, ray.remote(num_cpus=0.5)(split_csv).remote(f.uri, out_dir, cfg), plan_uri)
    for uri, (f, content, ref, plan_uri) in pending.items():
        try:
            files = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, InputError):  # a bad CSV: the same error as from the driver
                raise e.cause from None
            raise
        storage.write_bytes(plan_uri, json.dumps({"input": uri, "files": files}).encode(), cfg.storage)
        result[uri] = shards(f, content, files)
    return result


# --- reading one shard, in the worker ---------------------------------------------------------
