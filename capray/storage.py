"""Local paths and s3:// URIs behind one small API (pyarrow filesystems).

Everything that reads or writes outputs goes through here so that a job runs unchanged on a
laptop folder or an object-storage bucket. Credentials come from the config's `storage` section
or, when that is empty, from the standard AWS environment variables / instance profile.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

# One S3 client per process and endpoint/credentials, reused by every read: a client per read
# pays a TLS handshake and credential lookup each time, and with instance-profile credentials
# that pattern is what gets throttled. pyarrow filesystems are safe to share between threads.
_FILESYSTEMS: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_BUILT = 0
_RETRIED = 0
# Errors worth another try: the server or the network, not the request (a missing key or a
# denied access fails at once). Matched in pyarrow's OSError text (AWS SDK error names).
TRANSIENT = (
    "NETWORK_CONNECTION",
    "SLOW_DOWN",
    "SlowDown",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "THROTTLING",
    "Throttl",
    "REQUEST_TIMEOUT",
    "RequestTimeout",
    "curlCode",
    "Connection reset",
    "Broken pipe",
    "timed out",
    "HTTP response code: 5",
)


def is_remote(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path components for local paths and URIs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    """The folder of a local path or the prefix of an s3:// URI ("" for a bare name)."""
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)


def resolve(name: str, base: str = "") -> str:
    """An image name as the jobs key it: a URI as it is; a relative path joined to `base`; a local
    path absolute (keys must not depend on the directory a job ran from)."""
    if not name or is_remote(name):
        return name
    if not os.path.isabs(name) and base:
        name = join(base, name)
    return name if is_remote(name) else os.path.abspath(name)


def filesystem(uri: str, storage: Any = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    global _BUILT
    key = _key(storage)
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = _s3(storage)
            _BUILT += 1
    return fs, uri[len("s3://") :]


def listing_client(storage: Any = None) -> Any:
    """The process's botocore S3 client: its paginator streams a listing 1,000 keys per request
    (pyarrow's recursive listing returns the whole list at once)."""
    import botocore.session

    global _BUILT
    key = ("botocore",) + _key(storage)
    with _LOCK:
        if key not in _FILESYSTEMS:
            kwargs: dict[str, Any] = {}
            if storage is not None:
                if storage.endpoint_url:
                    kwargs["endpoint_url"] = storage.endpoint_url
                if storage.region:
                    kwargs["region_name"] = storage.region
                if storage.access_key_id:
                    kwargs.update(
                        aws_access_key_id=storage.access_key_id,
                        aws_secret_access_key=storage.secret_access_key,
                        aws_session_token=storage.session_token or None,
                    )
            _FILESYSTEMS[key] = botocore.session.get_session().create_client("s3", **kwargs)
            _BUILT += 1
        return _FILESYSTEMS[key]


def _key(storage: Any) -> tuple[str, ...]:
    return tuple(
        str(getattr(storage, k, "") or "")
        for k in ("endpoint_url", "region", "access_key_id", "secret_access_key", "session_token")
    )


def filesystems_built() -> int:
    """How many S3 clients (pyarrow, botocore) this process has built: one each per endpoint and credentials."""
    return _BUILT


def _s3(storage: Any) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if storage is not None:
        if storage.endpoint_url:
            kwargs["endpoint_override"] = storage.endpoint_url
            if storage.endpoint_url.startswith("http://"):
                kwargs["scheme"] = "http"
        if storage.region:
            kwargs["region"] = storage.region
        if storage.access_key_id:
            kwargs["access_key"] = storage.access_key_id
            kwargs["secret_key"] = storage.secret_access_key
            if storage.session_token:
                kwargs["session_token"] = storage.session_token
    return pafs.S3FileSystem(**kwargs)


def retried() -> int:
    """How many storage requests this process has tried again after a transient error."""
    return _RETRIED


def is_transient(e: BaseException) -> bool:
    """Whether a storage error may go away by itself (throttling, a 5xx, a dropped connection)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) or not isinstance(e, OSError):
        return False
    return any(marker in str(e) for marker in TRANSIENT)


def retrying(fn: Callable[[], T], what: str, storage: Any = None) -> T:
    """`fn()`, tried again after transient errors with exponential backoff and jitter.

    `storage.retries` more tries, waits from `storage.retry_wait_s` doubling up to 30 s. The
    last error is raised with the number of tries in its message.
    """
    global _RETRIED
    retries = int(getattr(storage, "retries", 5) if storage is not None else 5)
    wait = float(getattr(storage, "retry_wait_s", 0.5) if storage is not None else 0.5)
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if not is_transient(e):
                raise
            if attempt == retries:
                raise OSError(f"{e} (gave up after {retries + 1} tries)") from e
            _RETRIED += 1  # a racy += between threads only blurs a statistic
            delay = min(wait * 2**attempt, 30.0) * random.uniform(0.5, 1.0)
            log.warning(
                "storage: %s: %s; retrying in %.1f s (%d/%d)", what, str(e).splitlines()[0], delay, attempt + 1, retries
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(uri: str, storage: Any = None) -> bool:
    """Whether a file or directory exists at `uri`."""
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: Any = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, storage)

    def read() -> bytes:
        # A random-access file reads its known size in one GET; pyarrow's S3 input *stream*
        # read() fetches it in hundreds of small ranged GETs instead (bench/storage_read.py).
        with fs.open_input_file(path) as f:
            return f.read()

    return retrying(read, f"reading {uri}", storage) if is_remote(uri) else read()


def write_bytes(uri: str, data: bytes, storage: Any = None) -> None:
    """Write one file so that readers never see it half-written (temp name, then rename)."""
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if is_remote(uri):
        # An S3 object, single or multipart upload, only becomes visible once complete.
        def put() -> None:
            fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(data)

        retrying(put, f"writing {uri}", storage)
        return
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def upload_file(local_path: str, uri: str, storage: Any = None) -> None:
    """Copy a local file to `uri`, streamed; an S3 object only becomes visible once complete."""
    fs, path = filesystem(uri, storage)

    def copy() -> None:
        fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), recursive=True)
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    # The object is replaced as a whole, so a try cut short by the network is simply repeated.
    retrying(copy, f"uploading {uri}", storage) if is_remote(uri) else copy()


def delete_dir(uri: str, storage: Any = None) -> None:
    """Delete a folder/prefix and everything under it; nothing to do when it does not exist."""
    fs, path = filesystem(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def delete(uri: str, storage: Any = None) -> None:
    """Delete one file; nothing to do when it does not exist."""
    fs, path = filesystem(uri, storage)
    try:
        retrying(lambda: fs.delete_file(path), f"deleting {uri}", storage)
    except FileNotFoundError:
        pass


def list_files(uri: str, storage: Any = None, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under a folder/prefix (recursively), as URIs of the same kind, sorted."""
    fs, path = filesystem(uri, storage)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or posixpath.basename(info.path).startswith("."):
            continue
        if suffixes and not info.path.lower().endswith(suffixes):
            continue
        out.append("s3://" + info.path if is_remote(uri) else info.path)
    return sorted(out)


def upload_dir(local_dir: str, uri: str, storage: Any = None) -> None:
    """Replace the folder at `uri` with a copy of `local_dir`.

    Local: copied beside the target, then renamed over it, so the folder is never half-written.
    S3: one PUT per file (each atomic); callers publish a pointer file afterwards.
    """
    if not is_remote(uri):
        import shutil

        target = os.path.abspath(uri)
        staging = f"{target}.{uuid.uuid4().hex}.tmp"
        shutil.copytree(local_dir, staging)
        old = f"{target}.{uuid.uuid4().hex}.old"
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs, path = filesystem(uri, storage)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
