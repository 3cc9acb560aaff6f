"""Listings of image files: sorted by key, versioned, cut into content-defined chunks.

A folder or object-storage prefix (s3://, gs://, az://) of images becomes a *listing*: every image's key (its URI) with its
version (`<size>:<ETag>` on S3 and Azure, `<size>:<generation>` on GCS, `<size>:<mtime ns>` locally; both come with the LIST / scandir
that finds the file, so versions cost no extra request), in byte order of the keys, written as
chunk files of about `inputs.shard_rows` keys by Ray tasks, never held by the driver.

Chunk boundaries depend on the keys themselves, not on positions: a key whose hash is 0 modulo
`shard_rows` starts a new chunk (at most 2 x shard_rows keys each). Images added, removed or
overwritten anywhere in key order therefore change only the chunks they fall in; the others keep
their identity, and their output files stay done. A chunk is identified by the key range it
covers, [lo, hi) with lo its first key (none for the first chunk) and hi the next chunk's first
key (none for the last): the ranges of a listing partition all possible keys, so every row of an
earlier output belongs to exactly one chunk of a new listing (capray.shards).

Listings are kept under `<work_dir>/inputs/<input>-<hash>/<time>-<id>/` with `_listing.json`
(the chunk list) written last; the newest two are kept: the one in use and the one before it,
which `diff` compares it with.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import itertools
import json
import logging
import os
import posixpath
import stat as stat_module
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)
KEY, VERSION = "image", "image_version"
LISTING = "_listing.json"
# Listings kept per input: the one in use and the previous one (the re-run's "what changed").
KEEP_LISTINGS = 2
# Sub-folder groups listed in parallel (each by one Ray task, streaming).
MAX_GROUPS = 64
# Keys per listing request (1,000: the most S3 and Azure give; GCS would give more, in larger replies).
PAGE_SIZE = 1000


class ListingError(RuntimeError):
    """A listing that cannot be used (not in key order, no images); the jobs raise InputError."""


class Entry(NamedTuple):
    """One entry of a folder/prefix."""

    uri: str
    is_dir: bool
    size: int = 0
    version: str = ""  # S3 ETag, or local mtime in ns
    note: str = ""  # set: not a file to read (a local link loop, a FIFO...), counted as passed over


def digest(*parts: Any) -> str:
    """A short stable hash of `parts` (12 hex digits)."""
    return hashlib.sha1("\n".join(map(str, parts)).encode("utf-8")).hexdigest()[:12]


def stem(uri: str) -> str:
    """A file-name-safe short name for an input (its last path part without extension)."""
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".parquet", ".csv", ".tar"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe[:40] or "shard"


def suffixes(extensions: Any) -> tuple[str, ...]:
    """`[jpg, .PNG]` -> (".jpg", ".png")."""
    return tuple(f".{str(e).lower().lstrip('.')}" for e in extensions)


def is_image(name: str, cfg: Config) -> bool:
    """Whether a listed file is an image to process (`inputs.extensions`, `inputs.glob`)."""
    base = posixpath.basename(name)
    if base.startswith(".") or not base.lower().endswith(suffixes(cfg.inputs.extensions)):
        return False
    return not cfg.inputs.glob or fnmatch.fnmatch(base, cfg.inputs.glob)


def _norm(uri: str) -> str:
    return storage.resolve(uri).rstrip("/")  # a local path absolute, as a listing names it


def inside(uri: str, folders: list[str]) -> list[str]:
    """Those of `folders` that lie inside folder `uri` (below it, not it), normalised as a
    listing names them. A listing leaves out the job's own folders found inside its input
    (`caption.input=s3://bucket/` with `work_dir=s3://bucket/capray`), so that the job's own
    files are never taken for input images or manifests."""
    root = _norm(uri).rstrip("/") + "/"
    found = {_norm(f) for f in folders if f and _norm(f).startswith(root)}
    return sorted(f for f in found if not is_in(f, sorted(found - {f})))  # not one inside another


def same_folder(a: str, b: str) -> bool:
    return bool(a and b) and _norm(a) == _norm(b)


def is_in(key: str, folders: list[str]) -> bool:
    """Whether `key` is one of `folders` or below one."""
    return any(key == f or key.startswith(f + "/") for f in folders)


# --- walking a folder/prefix in key order ----------------------------------------------------


def walk(uri: str, storage_cfg: Any = None, recursive: bool = True) -> Iterator[Entry]:
    """Entries under a folder/prefix, streamed in byte order of their full keys (a folder sorts
    as its name + "/", as S3 orders keys). Recursive: files only; otherwise files and folders."""
    kind = storage.store(uri)
    if kind == "s3":
        yield from _walk_s3(uri, storage_cfg, recursive)
    elif kind == "gcs":
        yield from _walk_gcs(uri, storage_cfg, recursive)
    elif kind == "azure":
        yield from _walk_azure(uri, storage_cfg, recursive)
    else:
        yield from _walk_local(os.path.abspath(uri), recursive)


def _bucket(uri: str) -> tuple[str, str, str]:
    """(the URI up to its bucket's "/", the bucket, the key prefix ending in "/" or empty)."""
    scheme = storage.scheme(uri)
    bucket, _, key = uri[len(scheme) :].partition("/")
    return f"{scheme}{bucket}/", bucket, key.rstrip("/") + "/" if key else ""


# A page of a listing: (key, (size, version)) for an object, (key + "/", None) for a folder.
Page = list[tuple[str, "tuple[int, str] | None"]]


def _entries(root: str, pages: Iterator[Page]) -> Iterator[Entry]:
    """Pages of a listing -> entries in key order, one page in memory. A folder is held back
    until the first later key and given once: fake-gcs-server repeats every folder on every page
    of a delimited listing, where the services give it on the page of its position."""
    held: list[str] = []  # a heap of folders not yet given
    given: set[str] = set()
    for page in pages:
        for name, obj in sorted(page, key=lambda item: item[0]):
            if obj is None:
                if name not in given:
                    given.add(name)
                    heapq.heappush(held, name)
                continue
            while held and held[0] < name:
                yield Entry(root + heapq.heappop(held).rstrip("/"), True)
            if not name.endswith("/"):  # folder markers
                yield Entry(root + name, False, *obj)
    while held:
        yield Entry(root + heapq.heappop(held).rstrip("/"), True)


def _walk_s3(uri: str, storage_cfg: Any, recursive: bool) -> Iterator[Entry]:
    root, bucket, prefix = _bucket(uri)
    args = {"Bucket": bucket, "Prefix": prefix, **({} if recursive else {"Delimiter": "/"})}

    def pages() -> Iterator[Page]:
        # ListObjectsV2 a page per request, each tried again on its own (`storage.retries`).
        token: dict[str, str] = {}
        while True:
            request = partial(
                storage.s3_request, uri, storage_cfg, "list_objects_v2", MaxKeys=PAGE_SIZE, **args, **token
            )
            page = storage.retrying(request, f"listing {uri}", storage_cfg)
            yield [(p["Prefix"], None) for p in page.get("CommonPrefixes", ())] + [
                (o["Key"], (int(o["Size"]), str(o.get("ETag", "")).strip('"'))) for o in page.get("Contents", ())
            ]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    yield from _entries(root, pages())


def _walk_gcs(uri: str, storage_cfg: Any, recursive: bool) -> Iterator[Entry]:
    # The JSON API's objects.list, a page per request through gcsfs's own session (gcsfs's
    # listing gathers every page before returning); folders as `prefixes`, as S3's CommonPrefixes.
    fs = storage.fsspec_filesystem(uri, storage_cfg)
    root, bucket, prefix = _bucket(uri)

    def pages() -> Iterator[Page]:
        token = ""
        while True:
            params: dict[str, Any] = {"prefix": prefix, "maxResults": PAGE_SIZE}
            if not recursive:
                params["delimiter"] = "/"
            if token:
                params["pageToken"] = token
            request: Callable[[], dict[str, Any]] = partial(fs.call, "GET", "b/{}/o", bucket, json_out=True, **params)
            page = storage.retrying(request, f"listing {uri}", storage_cfg)
            yield [(p, None) for p in page.get("prefixes", ())] + [
                (o["name"], (int(o.get("size", 0)), _gcs_version(o))) for o in page.get("items", ())
            ]
            token = page.get("nextPageToken", "")
            if not token:
                return

    yield from _entries(root, pages())


def _gcs_version(obj: dict[str, Any]) -> str:
    # The generation changes with every upload of the object, and only then (not on metadata edits).
    return str(obj.get("generation") or obj.get("etag", ""))


def _walk_azure(uri: str, storage_cfg: Any, recursive: bool) -> Iterator[Entry]:
    # The Blob service's List Blobs, a page per request on adlfs's client and event loop (adlfs's
    # own listing gathers every page before returning).
    from fsspec.asyn import sync

    fs = storage.fsspec_filesystem(uri, storage_cfg)
    root, container, prefix = _bucket(uri)
    client = fs.service_client.get_container_client(container)
    if recursive:
        paged = client.list_blobs(name_starts_with=prefix or None, results_per_page=PAGE_SIZE)
    else:
        paged = client.walk_blobs(name_starts_with=prefix or None, delimiter="/", results_per_page=PAGE_SIZE)
    by_page = paged.by_page()

    async def next_page() -> Page | None:
        try:
            page = await by_page.__anext__()
        except StopAsyncIteration:
            return None
        # A BlobPrefix (a folder of a delimited listing) has no size.
        return [(b.name, (int(b.size), str(b.etag).strip('"')) if hasattr(b, "size") else None) async for b in page]

    def pages() -> Iterator[Page]:
        while (page := storage.retrying(lambda: sync(fs.loop, next_page), f"listing {uri}", storage_cfg)) is not None:
            yield page

    yield from _entries(root, pages())


def _walk_local(path: str, recursive: bool, above: frozenset[tuple[int, int]] | None = None) -> Iterator[Entry]:
    """A local folder's entries in key order. Links are followed, as a user who links a folder of
    photos into the input means its photos: a link to a folder is a folder (its keys under the
    link's path), a link to a file is that file (its version the file's). A link back to the folder
    it is in or one above it (a loop) and what is not a regular file (a FIFO named x.jpg would block
    its reader) are entries with a `note`, counted among the files passed over. A broken link is a
    file of its own version: named as an image, it becomes an error row, as a missing image does.
    `above`: (device, inode) of `path` and of every folder above it, the loops' targets."""
    if above is None:
        above = _folders_above(path)
    with os.scandir(path) as it:
        entries = sorted(((e.name + "/" if _is_folder(e) else e.name), e) for e in it)
    for name, e in entries:
        if name.endswith("/"):
            try:
                st = e.stat()
            except FileNotFoundError:  # removed while listing: not part of this listing
                continue
            if (st.st_dev, st.st_ino) in above:
                yield Entry(e.path, False, note="(link to a folder above it)")
            elif recursive:
                yield from _walk_local(e.path, True, above | {(st.st_dev, st.st_ino)})
            else:
                yield Entry(e.path, True)
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            if not e.is_symlink():  # removed while listing: not part of this listing
                continue
            try:
                st = e.stat(follow_symlinks=False)  # a broken link: read as a missing image
            except FileNotFoundError:
                continue
            yield Entry(e.path, False, st.st_size, f"link:{st.st_mtime_ns}")
            continue
        if not stat_module.S_ISREG(st.st_mode):
            yield Entry(e.path, False, note="(not a regular file)")
        else:
            yield Entry(e.path, False, st.st_size, str(st.st_mtime_ns))


def _is_folder(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()  # a link to a folder too
    except OSError:  # a link loop that the system itself refuses to follow (ELOOP)
        return False


def _folders_above(path: str) -> frozenset[tuple[int, int]]:
    """(device, inode) of `path` and of each folder above it, as reached through `path`'s links."""
    found, p = set(), path
    while True:
        try:
            st = os.stat(p)
            found.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(p)
        if parent == p:
            return frozenset(found)
        p = parent


def stat(uri: str, storage_cfg: Any = None) -> tuple[int, str]:
    """(size, version) of one file, as a listing records it: S3 ETag, local mtime in ns."""
    if storage.store(uri) in ("gcs", "azure"):
        fs, path = storage.fsspec_filesystem(uri, storage_cfg), storage.filesystem(uri, storage_cfg)[1]
        info = storage.retrying(lambda: fs.info(path), f"reading the size and version of {uri}", storage_cfg)
        version = _gcs_version(info) if storage.store(uri) == "gcs" else str(info.get("etag", "")).strip('"')
        return int(info["size"]), version
    if storage.is_remote(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        head = storage.retrying(
            partial(storage.s3_request, uri, storage_cfg, "head_object", Bucket=bucket, Key=key),
            f"reading the size and ETag of {uri}",
            storage_cfg,
        )
        return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')
    st = os.stat(uri)
    return st.st_size, str(st.st_mtime_ns)


# --- content-defined chunks ------------------------------------------------------------------


def starts_chunk(key: str, shard_rows: int) -> bool:
    """Whether `key` begins a new chunk: decided by the key alone, so that boundaries stay put
    when other keys come and go."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return h % shard_rows == 0


class ChunkWriter:
    """Cuts a stream of (key, version) in key order into content-defined chunks, each written
    as a Parquet file (`image`, `image_version`) under `out_dir`. Memory: one chunk."""

    def __init__(self, out_dir: str, name: str, shard_rows: int, storage_cfg: Any = None):
        self.out_dir, self.name, self.shard_rows, self.storage_cfg = out_dir, name, shard_rows, storage_cfg
        self.keys: list[str] = []
        self.versions: list[str | None] = []
        self.chunks: list[dict[str, Any]] = []
        self.written = 0  # chunk files so far, taken or not: names are never reused

    def add(self, key: str, version: str | None) -> None:
        if self.keys and (len(self.keys) >= 2 * self.shard_rows or starts_chunk(key, self.shard_rows)):
            self.cut()
        self.keys.append(key)
        self.versions.append(version)

    def cut(self) -> None:
        """End the current chunk here (also where the key order continues in another task)."""
        if not self.keys:
            return
        uri = storage.join(self.out_dir, f"{self.name}-{self.written:05d}.parquet")
        self.written += 1
        sink = pa.BufferOutputStream()
        pq.write_table(
            pa.table({KEY: pa.array(self.keys, pa.string()), VERSION: pa.array(self.versions, pa.string())}), sink
        )
        storage.write_bytes(uri, sink.getvalue().to_pybytes(), self.storage_cfg)
        h = hashlib.sha1()
        for k, v in zip(self.keys, self.versions):
            h.update(f"{k}\t{v or ''}\n".encode("utf-8", "surrogateescape"))
        self.chunks.append(
            {
                "file": uri,
                "rows": len(self.keys),
                "first": self.keys[0],
                "last": self.keys[-1],
                "digest": h.hexdigest()[:12],
            }
        )
        self.keys, self.versions = [], []

    def take(self) -> list[dict[str, Any]]:
        """The chunks written so far (and forget them)."""
        out, self.chunks = self.chunks, []
        return out


# How many file extensions a listing counts apart among the files it passes over; the rest are
# counted together as "(other)", so that the count stays small whatever the bucket holds.
PASSED_KINDS = 20


def pass_over(passed: dict[str, int], uri: str) -> None:
    """Count a listed file that is not an image to process under its extension (`passed`: the
    counts so far). Hidden files (.DS_Store, .keep) are not counted."""
    base = posixpath.basename(uri)
    if not base.startswith("."):
        count_passed(passed, posixpath.splitext(base)[1].lower() or "(no extension)")


def count_passed(passed: dict[str, int], kind: str, n: int = 1) -> None:
    """Add `n` files of extension `kind` to `passed`, past PASSED_KINDS extensions as "(other)"."""
    if kind not in passed and len(passed) >= PASSED_KINDS:
        kind = "(other)"
    passed[kind] = passed.get(kind, 0) + n


def passed_summary(passed: dict[str, int]) -> str:
    """`1200 .txt, 30 .avif`: the files a listing passed over, most first."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(passed.items(), key=lambda kv: (-kv[1], kv[0])))


def list_top(uri: str, out_dir: str, cfg: Config, skip: list[str] | None = None) -> list[list[Any]]:
    """Ray task: the top level of `uri` in key order, as segments: ["chunks", [chunk...]] for a
    run of image files (written here) and ["folders", [uri...]] for a run of sub-folders; last
    ["passed", {extension: files}], the files that are not images to process. The folders
    `skip` (the job's own) and what is in them are left out."""
    writer = ChunkWriter(out_dir, "top", cfg.inputs.shard_rows, cfg.storage)
    segments: list[list[Any]] = []
    passed: dict[str, int] = {}
    skip = skip or []
    for e in walk(uri, cfg.storage, recursive=False):
        if is_in(e.uri, skip):
            continue
        if e.is_dir:
            writer.cut()  # the folder's keys sort between this run of files and the next
            if writer.chunks:
                segments.append(["chunks", writer.take()])
            if segments and segments[-1][0] == "folders":
                segments[-1][1].append(e.uri)
            else:
                segments.append(["folders", [e.uri]])
        elif e.note:
            count_passed(passed, e.note)
        elif is_image(e.uri, cfg):
            writer.add(e.uri, f"{e.size}:{e.version}")
        else:
            pass_over(passed, e.uri)
    writer.cut()
    if writer.chunks:
        segments.append(["chunks", writer.take()])
    return [*segments, ["passed", passed]]


def list_folders(
    folders: list[str], out_dir: str, group: int, cfg: Config, skip: list[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Ray task: the image files under consecutive sub-folders, recursively, as chunks; and the
    files passed over, by extension. Files in the folders `skip` (the job's own) are left out."""
    writer = ChunkWriter(out_dir, f"g{group:05d}", cfg.inputs.shard_rows, cfg.storage)
    passed: dict[str, int] = {}
    skip = skip or []
    for folder in folders:
        for e in walk(folder, cfg.storage, recursive=True):
            if is_in(e.uri, skip):
                continue
            if e.note:
                count_passed(passed, e.note)
            elif is_image(e.uri, cfg):
                writer.add(e.uri, f"{e.size}:{e.version}")
            else:
                pass_over(passed, e.uri)
    writer.cut()
    return writer.chunks, passed


def chunk_names(table_uri: str, column: str, out_dir: str, cfg: Config) -> list[dict[str, Any]]:
    """Ray task: the distinct values of a table's column (e.g. the split's images), sorted and
    chunked like a listing; no versions (images named by a table are keyed by name only)."""
    import pyarrow.compute as pc

    fs, path = storage.filesystem(table_uri, cfg.storage)
    with fs.open_input_file(path) as f:
        names = pc.unique(pq.read_table(f, columns=[column])[column].cast(pa.string()).drop_null()).to_pylist()
    return chunk_list(sorted(names), out_dir, cfg)


def chunk_list(names: list[str], out_dir: str, cfg: Config) -> list[dict[str, Any]]:
    """Sorted names -> chunks (written under `out_dir`)."""
    writer = ChunkWriter(out_dir, "names", cfg.inputs.shard_rows, cfg.storage)
    for name in names:
        writer.add(name, None)
    writer.cut()
    return writer.chunks


# --- a listing: taken by Ray tasks, saved, reused, compared ------------------------------------


@dataclass
class Listing:
    """A saved listing: its chunks in key order, where and when it was taken, and the files it
    passed over (not images to process), by extension."""

    folder: str
    taken_at: float
    chunks: list[dict[str, Any]]
    passed_over: dict[str, int] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # the job's own folders inside the input

    @property
    def rows(self) -> int:
        return sum(c["rows"] for c in self.chunks)


def ranges(chunks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each chunk's key range [lo, hi): "" is open (the first lo, the last hi)."""
    return [
        ("" if i == 0 else c["first"], chunks[i + 1]["first"] if i + 1 < len(chunks) else "")
        for i, c in enumerate(chunks)
    ]


def _check_order(chunks: list[dict[str, Any]], what: str) -> None:
    for a, b in itertools.pairwise(chunks):
        if not a["last"] < b["first"]:
            raise ListingError(
                f"{what}: the listing is not in key order ({a['last']!r} before {b['first']!r}); "
                "the storage returned keys in an order capray cannot track"
            )


def _saved(folder: str, storage_cfg: Any) -> list[str]:
    """The complete listings under an input's listing folder, oldest first."""
    if not storage.exists(folder, storage_cfg):
        return []
    subs = sorted(e.uri for e in walk(folder, storage_cfg, recursive=False) if e.is_dir)
    return [s for s in subs if storage.exists(storage.join(s, LISTING), storage_cfg)]


def save(input_uri: str, listed: Listing, storage_cfg: Any) -> None:
    """Write `_listing.json`, last: a listing folder without it is incomplete and ignored."""
    body = {
        "input": input_uri,
        "taken_at": listed.taken_at,
        "chunks": listed.chunks,
        "passed_over": listed.passed_over,
        "left_out": listed.left_out,
    }
    storage.write_bytes(storage.join(listed.folder, LISTING), json.dumps(body).encode(), storage_cfg)


def load(folder: str, storage_cfg: Any) -> Listing:
    saved = json.loads(storage.read_bytes(storage.join(folder, LISTING), storage_cfg))
    return Listing(folder, saved["taken_at"], saved["chunks"], saved.get("passed_over", {}), saved.get("left_out", []))


def home(cfg: Config, uri: str, cache_dir: str) -> str:
    """Where the listings of input `uri` are kept (one folder per input and image filter)."""
    return storage.join(cache_dir, f"{stem(uri)}-{digest(uri, list(cfg.inputs.extensions), cfg.inputs.glob)}")


def obtain(
    cfg: Config, uri: str, cache_dir: str, skip: list[str] | None = None
) -> tuple[Listing, Listing | None, bool]:
    """(the listing to use, the one before it or None, whether it was reused): a new listing
    (without the folders `skip`) unless `inputs.relist` is false and one is saved."""
    saved = _saved(home(cfg, uri, cache_dir), cfg.storage)
    if saved and not cfg.inputs.relist:
        return load(saved[-1], cfg.storage), (load(saved[-2], cfg.storage) if len(saved) > 1 else None), True
    before = load(saved[-1], cfg.storage) if saved else None
    return take(cfg, uri, cache_dir, skip), before, False


def take(cfg: Config, uri: str, cache_dir: str, skip: list[str] | None = None) -> Listing:
    """List `uri` now, in Ray tasks (the top level, then groups of sub-folders in parallel),
    without the folders `skip` (the job's own), and save the listing; older listings beyond the
    previous one are deleted."""
    import ray

    skip = skip or []

    base = home(cfg, uri, cache_dir)
    older = _saved(base, cfg.storage)
    started = time.time()
    # Named by the time taken (to the microsecond), so that names sort oldest first.
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"{int(started * 1e6) % 1_000_000:06d}"
    out_dir = storage.join(base, f"{stamp}-{uuid.uuid4().hex[:8]}")
    top = ray.get(ray.remote(num_cpus=0.5)(list_top).remote(uri, out_dir, cfg, skip))
    n_folders = sum(len(items) for kind, items in top if kind == "folders")
    per_group = max(1, -(-n_folders // MAX_GROUPS))
    task = ray.remote(num_cpus=0.5)(list_folders)
    parts: list[Any] = []  # in key order: chunk lists, or the ObjectRef of a group's (chunks, passed)
    passed: dict[str, int] = {}
    group = 0
    for kind, items in top:
        if kind == "chunks":
            parts.append(items)
        elif kind == "passed":
            passed = items
        else:
            for k in range(0, len(items), per_group):
                group += 1
                parts.append(task.remote(items[k : k + per_group], out_dir, group, cfg, skip))
    chunks: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, list):
            part, more = ray.get(part)
            for kind, n in more.items():
                count_passed(passed, kind, n)
        chunks.extend(part)
    _check_order(chunks, uri)
    listed = Listing(out_dir, started, chunks, passed, skip)
    save(uri, listed, cfg.storage)
    for stale in older[: max(0, len(older) - (KEEP_LISTINGS - 1))]:
        storage.delete_dir(stale, cfg.storage)
    return listed


def _read_range(uri: str, lo: str, hi: str, storage_cfg: Any) -> dict[str, str | None]:
    fs, path = storage.filesystem(uri, storage_cfg)
    with fs.open_input_file(path) as f:
        t = pq.read_table(f, columns=[KEY, VERSION])
    return {k: v for k, v in zip(t[KEY].to_pylist(), t[VERSION].to_pylist()) if k >= lo and (not hi or k < hi)}


def diff_chunks(pairs: list[tuple[dict[str, Any], str, str, list[str]]], storage_cfg: Any) -> dict[str, int]:
    """Ray task: for (new chunk, lo, hi, overlapping old chunk files): images new, changed
    (another version), removed and unchanged. Memory: one chunk and its old counterparts."""
    counts = {"new": 0, "changed": 0, "removed": 0, "unchanged": 0}
    for chunk, lo, hi, old_files in pairs:
        new = _read_range(chunk["file"], lo, hi, storage_cfg)
        old: dict[str, str | None] = {}
        for f in old_files:
            old.update(_read_range(f, lo, hi, storage_cfg))
        same = sum(1 for k, v in new.items() if k in old and old[k] == v)
        both = sum(1 for k in new if k in old)
        counts["unchanged"] += same
        counts["changed"] += both - same
        counts["new"] += len(new) - both
        counts["removed"] += len(old) - both
    return counts


def overlaps(new: list[tuple[str, str]], old: list[tuple[str, str]]) -> list[list[int]]:
    """For each range of `new`, the indices of the ranges of `old` it overlaps (both lists
    sorted by lo; `old` may overlap itself). A sweep: O(n + m + overlaps)."""
    import heapq

    order = sorted(range(len(old)), key=lambda j: old[j][0])
    active: list[tuple[tuple[int, str], int]] = []  # (hi as a sortable pair, index): "" = +inf
    out, k = [], 0
    for lo, hi in new:
        while k < len(order) and (not hi or old[order[k]][0] < hi):
            j = order[k]
            heapq.heappush(active, ((1, "") if not old[j][1] else (0, old[j][1]), j))
            k += 1
        while active and active[0][0][0] == 0 and active[0][0][1] <= lo:
            heapq.heappop(active)
        out.append(sorted(j for (_, j) in active if old[j][1] == "" or old[j][1] > lo))
    return out


def diff(new: Listing, old: Listing, storage_cfg: Any) -> dict[str, int]:
    """Images new / changed / removed / unchanged between two listings of one input: chunks with
    the same range and digest are unchanged without being read; the others are compared by
    Ray tasks, a few chunks each. The driver handles chunk descriptors only."""
    import ray

    new_r, old_r = ranges(new.chunks), ranges(old.chunks)
    totals = {"new": 0, "changed": 0, "removed": 0, "unchanged": 0}
    pairs = []
    for (lo, hi), chunk, olds in zip(new_r, new.chunks, overlaps(new_r, old_r)):
        if len(olds) == 1 and old_r[olds[0]] == (lo, hi) and old.chunks[olds[0]]["digest"] == chunk["digest"]:
            totals["unchanged"] += chunk["rows"]
        else:
            pairs.append((chunk, lo, hi, [old.chunks[j]["file"] for j in olds]))
    task = ray.remote(num_cpus=0.5)(diff_chunks)
    refs = [task.remote(pairs[k : k + 32], storage_cfg) for k in range(0, len(pairs), 32)]
    for counts in ray.get(refs):
        for key, n in counts.items():
            totals[key] += n
    return totals
