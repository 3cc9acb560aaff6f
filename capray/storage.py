"""Local paths and object-storage URIs (s3://, gs://, az:// or abfs://) behind one small API.

Everything that reads or writes outputs goes through here so that a job runs unchanged on a
laptop folder or a bucket of any of the three stores. Every store is reached as a pyarrow
filesystem: S3 through pyarrow's own (with botocore for whole-file reads and listings), Google
Cloud Storage and Azure Blob through fsspec's gcsfs and adlfs (the clients img2dataset, Ray Data
and pandas use), wrapped by pyarrow's FSSpecHandler. Credentials come from the config's
`storage` section or, when that is empty, from each store's standard environment (AWS variables
or instance profile; Google application default credentials; AZURE_STORAGE_* variables).
"""

from __future__ import annotations

import importlib
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

# URI prefix -> store. abfs:// is adlfs's name for the same Azure Blob containers as az://.
STORES = {"s3://": "s3", "gs://": "gcs", "az://": "azure", "abfs://": "azure"}
# Any other `scheme://` would be taken for a local relative path (`./https:/host/a.jpg`): written
# to as one, or reported "not found" as one. Such a URI is refused by name, with what to give.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_WEB = "capray reads no web URLs: copy it to local disk or object storage first (images: img2dataset downloads them)"
_INSTEAD = {
    "http://": _WEB,
    "https://": _WEB,
    "file://": "give the local path without file://",
    "gcs://": "write it gs://",
    "s3a://": "write it s3://",
    "s3n://": "write it s3://",
    "abfss://": "write it abfs:// or az://",
    "wasb://": "write it az://<container>/...",
    "wasbs://": "write it az://<container>/...",
}


class UnsupportedURI(OSError):
    """A URI of a scheme capray does not read: an OSError, so that an image named so in a manifest
    is an error row, as an unreadable one is."""


def unsupported(uri: str) -> str:
    """Why `uri` cannot be read or written ("" when it can: a local path or an object-storage URI)."""
    found = _SCHEME.match(uri)
    if not found or found.group(0) in STORES:
        return ""
    prefix = found.group(0).lower()
    instead = _INSTEAD.get(prefix) or (f"write it {prefix}" if prefix in STORES else "")
    return f"{uri}: not a local path or an s3://, gs://, az:// or abfs:// URI" + (f": {instead}" if instead else "")


# The optional extra that installs each fsspec store (`pip install capray[gcs]`).
EXTRAS = {"gcs": ("gcsfs", "gcs"), "azure": ("adlfs", "azure")}
# The config keys that pick each store's client (a client per distinct value set).
CLIENT_KEYS = {
    "s3": ("endpoint_url", "region", "access_key_id", "secret_access_key", "session_token"),
    "gcs": ("gcs_endpoint_url", "gcs_project", "gcs_token"),
    "azure": ("azure_endpoint_url", "azure_account_name", "azure_account_key", "azure_connection_string"),
}

# One client per process and store/endpoint/credentials, reused by every read: a client per read
# pays a TLS handshake and credential lookup each time, and with instance-profile credentials
# that pattern is what gets throttled. pyarrow filesystems, and fsspec's async ones (their
# requests run on one event-loop thread), are safe to share between threads.
_FILESYSTEMS: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_BUILT = 0
_RETRIED = 0
# Errors worth another try: the server or the network, not the request (a missing key or a
# denied access fails at once). S3: matched in pyarrow's OSError text (AWS SDK error names).
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
# gcsfs, adlfs and botocore raise their clients' own exceptions: a status code (gcsfs HttpError.code,
# azure-core HttpResponseError.status_code, aiohttp's .status, botocore's response) or a class that
# means "no answer".
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_TYPES = {
    "ServiceRequestError",  # azure-core: the request never reached the service
    "ServiceResponseError",  # azure-core: the connection broke before a response
    "ClientConnectionError",  # aiohttp (gcsfs, adlfs's transport): refused, reset, disconnected
    "ClientPayloadError",  # aiohttp: a body cut short
    "TransportError",  # google-auth: the token endpoint unreachable
    "HTTPClientError",  # botocore: the connection closed, timed out or broke mid-body
    "IncompleteReadError",  # botocore: a body shorter than its Content-Length
    "ResourceModifiedError",  # azure-core: a blob replaced between the chunks of one download
    "TimeoutError",
    "ConnectionError",
}


def scheme(uri: str) -> str:
    """The object-storage prefix of `uri` ("s3://", "gs://", "az://", "abfs://"), "" for a local path."""
    return next((p for p in STORES if uri.startswith(p)), "")


def is_remote(uri: str) -> bool:
    """True for object-storage URIs (s3://, gs://, az://, abfs://)."""
    return scheme(uri) != ""


def store(uri: str) -> str:
    """ "s3", "gcs" or "azure" for a URI; "" for a local path."""
    return STORES.get(scheme(uri), "")


def join(base: str, *parts: str) -> str:
    """Join path components for local paths and URIs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    """The folder of a local path or the prefix of a URI ("" for a bare name)."""
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)


def resolve(name: str, base: str = "") -> str:
    """An image name as the jobs key it: a URI as it is; a relative path joined to `base`; a local
    path absolute (keys must not depend on the directory a job ran from)."""
    if not name or is_remote(name) or unsupported(name):
        return name  # an unsupported URI as given: its error row names it
    if not os.path.isabs(name) and base:
        name = join(base, name)
    return name if is_remote(name) else os.path.abspath(name)


def _local(uri: str) -> str:
    """A local path made absolute; UnsupportedURI for a URI of another scheme (`https://...`)."""
    if why := unsupported(uri):
        raise UnsupportedURI(why)
    return os.path.abspath(uri)


def filesystem(uri: str, storage: Any = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it (`bucket/key`)."""
    prefix = scheme(uri)
    if not prefix:
        return pafs.LocalFileSystem(), _local(uri)
    kind = STORES[prefix]
    fs = _client(kind, storage, {"s3": _s3, "gcs": _gcs, "azure": _azure}[kind])
    return fs, uri[len(prefix) :]


def fsspec_filesystem(uri: str, storage: Any = None) -> Any:
    """The fsspec filesystem (gcsfs, adlfs) behind a gs:// or az:// URI's pyarrow one: its
    session also serves the paged listings (capray.listing)."""
    fs, _ = filesystem(uri, storage)
    if not isinstance(fs, pafs.PyFileSystem):
        raise ValueError(f"{uri}: not a gs:// or az:// URI")
    return fs.handler.fs


def _client(kind: str, storage: Any, build: Callable[[Any], Any]) -> Any:
    global _BUILT
    key = (kind,) + _key(storage, kind)
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = build(storage)
            _BUILT += 1
    return fs


def s3_client(storage: Any = None) -> Any:
    """The process's botocore S3 client: whole-object reads (one GET, `read_bytes`) and listings
    (1,000 keys per request, page by page; pyarrow's recursive listing returns the whole list at
    once). Its own retries are off: `storage.retries` is the one count (`retrying`)."""

    def build(storage: Any) -> Any:
        import botocore
        import botocore.session
        from botocore.config import Config

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
        # A connection per I/O thread (inputs.io_threads) without "pool is full" discards.
        config = Config(retries={"total_max_attempts": 1}, max_pool_connections=64)
        session = botocore.session.get_session()
        if "aws_access_key_id" not in kwargs and session.get_credentials() is None:
            # No credentials anywhere: unsigned requests (a public bucket), as pyarrow's client
            # sends them; botocore would refuse with NoCredentialsError instead.
            config = config.merge(Config(signature_version=botocore.UNSIGNED))
            log.info("storage: no AWS credentials found; S3 requests go unsigned (public buckets only)")
        return session.create_client("s3", config=config, **kwargs)

    return _client("botocore", storage, build)


def _key(storage: Any, kind: str) -> tuple[str, ...]:
    return tuple(str(getattr(storage, k, "") or "") for k in CLIENT_KEYS.get(kind, CLIENT_KEYS["s3"]))


def filesystems_built() -> int:
    """How many storage clients this process has built: one per store, endpoint and credentials
    (S3: a pyarrow one and a botocore one for whole-object reads and listings)."""
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


def _require(kind: str) -> Any:
    module, extra = EXTRAS[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{kind} URIs need {module}, which is not installed: pip install 'capray[{extra}]'") from None


def _gcs(storage: Any) -> pafs.PyFileSystem:
    _require("gcs")
    # gcsfs's default class (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT) first asks the Storage Control
    # gRPC API each bucket's layout, again after every failed ask: an extra call per bucket in
    # production and a 60 s time-out per operation against an emulator. capray reads whole
    # objects and lists prefixes, which the plain JSON API class does alike on every bucket.
    from gcsfs.core import GCSFileSystem

    kwargs: dict[str, Any] = {}
    if getattr(storage, "gcs_endpoint_url", ""):
        kwargs["endpoint_url"] = storage.gcs_endpoint_url
    if getattr(storage, "gcs_project", ""):
        kwargs["project"] = storage.gcs_project
    if getattr(storage, "gcs_token", ""):
        kwargs["token"] = storage.gcs_token
    # skip_instance_cache: capray keeps its own one-per-process cache, keyed by the config.
    return pafs.PyFileSystem(pafs.FSSpecHandler(GCSFileSystem(skip_instance_cache=True, **kwargs)))


def _azure(storage: Any) -> pafs.PyFileSystem:
    adlfs = _require("azure")
    kwargs: dict[str, Any] = {}
    endpoint = getattr(storage, "azure_endpoint_url", "")
    name, key = getattr(storage, "azure_account_name", ""), getattr(storage, "azure_account_key", "")
    if getattr(storage, "azure_connection_string", ""):
        kwargs["connection_string"] = storage.azure_connection_string
    elif endpoint:
        # adlfs builds https://<account_host> only; a connection string also takes http (Azurite).
        parts = [f"DefaultEndpointsProtocol={endpoint.split('://')[0]}", f"BlobEndpoint={endpoint}"]
        parts += [f"AccountName={name}"] if name else []
        parts += [f"AccountKey={key}"] if key else []
        kwargs["connection_string"] = ";".join(parts) + ";"
    elif name:
        kwargs["account_name"] = name
        if key:
            kwargs["account_key"] = key
    return pafs.PyFileSystem(pafs.FSSpecHandler(adlfs.AzureBlobFileSystem(skip_instance_cache=True, **kwargs)))


def retried() -> int:
    """How many storage requests this process has tried again after a transient error."""
    return _RETRIED


def is_transient(e: BaseException) -> bool:
    """Whether a storage error may go away by itself (throttling, a 5xx, a dropped connection),
    as S3 (pyarrow), Google Cloud Storage (gcsfs) and Azure Blob (adlfs) report it."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) or not isinstance(e, Exception):
        return False
    for attr in ("status_code", "code", "status"):
        status = getattr(e, attr, None)
        if isinstance(status, (int, str)) and str(status).isdigit() and int(status) in TRANSIENT_STATUS:
            return True
    response = getattr(e, "response", None)  # botocore's ClientError (a listing's page)
    if isinstance(response, dict) and response.get("ResponseMetadata", {}).get("HTTPStatusCode") in TRANSIENT_STATUS:
        return True
    if any(t.__name__ in TRANSIENT_TYPES for t in type(e).__mro__):
        return True
    return isinstance(e, OSError) and any(marker in str(e) for marker in TRANSIENT)


def is_storage_error(e: BaseException) -> bool:
    """An error of a store's client (unreachable endpoint, bad credentials, no permission)."""
    module = type(e).__module__
    return isinstance(e, OSError) or module.startswith(("botocore", "gcsfs", "google", "azure", "adlfs", "aiohttp"))


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
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == retries:
                raise OSError(f"{e} (gave up after {retries + 1} tries)") from e
            _RETRIED += 1  # a racy += between threads only blurs a statistic
            delay = min(wait * 2**attempt, 30.0) * random.uniform(0.5, 1.0)
            log.warning(
                "storage: %s: %s; retrying in %.1f s (%d/%d)",
                what,
                (str(e).splitlines() or [type(e).__name__])[0],
                delay,
                attempt + 1,
                retries,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(uri: str, storage: Any = None) -> bool:
    """Whether a file or directory exists at `uri`."""
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: Any = None) -> bytes:
    """The whole content of one file, one version of it even while it is being rewritten."""
    if not is_remote(uri):
        with open(_local(uri), "rb") as f:
            return f.read()
    # One GET of the whole object: a response holds one version. A file opened for random access
    # (pyarrow's, fsspec's) takes the size from one request and reads the bytes with others, so an
    # object replaced in between read as the new content cut short or, on S3, padded with
    # whatever was in memory (tests/test_stores.py). Only Azure splits a large blob's download,
    # pinned to the first response's ETag (a change between is ResourceModifiedError, retried).
    if store(uri) == "s3":
        return retrying(lambda: _get_s3(uri, storage), f"reading {uri}", storage)
    fs, path = fsspec_filesystem(uri, storage), uri[len(scheme(uri)) :]
    return retrying(lambda: bytes(fs.cat_file(path)), f"reading {uri}", storage)


def _get_s3(uri: str, storage: Any) -> bytes:
    bucket, _, key = uri[len("s3://") :].partition("/")
    # botocore checks the body against the response's Content-Length (IncompleteReadError).
    return s3_request(uri, storage, "get_object", Bucket=bucket, Key=key)["Body"].read()


def s3_request(uri: str, storage: Any, operation: str, **params: Any) -> Any:
    """One request of the botocore client (`get_object`, `head_object`, `list_objects_v2`...),
    its refusals raised as the OSErrors pyarrow raises (`s3_error`); not retried."""
    from botocore.exceptions import ClientError

    try:
        return getattr(s3_client(storage), operation)(**params)
    except ClientError as e:
        raise s3_error(uri, e) from None


def s3_error(uri: str, e: Any) -> OSError:
    """A botocore ClientError as the OSError pyarrow would raise: FileNotFoundError for a missing
    key or bucket, PermissionError for a denied one, else an OSError carrying the HTTP status
    (what `is_transient` reads)."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = f"{uri}: {code or status}: {e.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket"):
        return FileNotFoundError(message)
    if status == 403 or code == "AccessDenied":
        return PermissionError(message)
    return StoreError(message, status)


class StoreError(OSError):
    """A store's refusal that is neither "not found" nor "denied", with its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def write_bytes(uri: str, data: bytes, storage: Any = None) -> None:
    """Write one file so that readers never see it half-written (temp name, then rename)."""
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if is_remote(uri):
        # An object (S3 single or multipart upload, GCS upload, Azure block list) only becomes
        # visible once complete.
        def put() -> None:
            _make_parent(uri, fs, parent)
            with fs.open_output_stream(path) as f:
                f.write(data)

        retrying(put, f"writing {uri}", storage)
        return
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def _make_parent(uri: str, fs: pafs.FileSystem, parent: str) -> None:
    # pyarrow's S3 filesystem wants the folder (a marker object); GCS and Azure have no folders,
    # and their mkdir would create a missing bucket or container instead of failing.
    if store(uri) == "s3" or not is_remote(uri):
        fs.create_dir(parent, recursive=True)


def upload_file(local_path: str, uri: str, storage: Any = None) -> None:
    """Copy a local file to `uri`, streamed; an object only becomes visible once complete."""
    fs, path = filesystem(uri, storage)

    def copy() -> None:
        _make_parent(uri, fs, posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path))
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
        out.append(scheme(uri) + info.path if is_remote(uri) else info.path)
    return sorted(out)


def upload_dir(local_dir: str, uri: str, storage: Any = None) -> None:
    """Replace the folder at `uri` with a copy of `local_dir`.

    Local: copied beside the target, then renamed over it, so the folder is never half-written.
    Object storage: one upload per file (each atomic); callers publish a pointer file afterwards.
    """
    if not is_remote(uri):
        import shutil

        target = _local(uri)
        staging = f"{target}.{uuid.uuid4().hex}.tmp"
        shutil.copytree(local_dir, staging)
        old = f"{target}.{uuid.uuid4().hex}.old"
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    for root, _, files in os.walk(local_dir):
        for name in files:
            local = os.path.join(root, name)
            upload_file(local, join(uri, *os.path.relpath(local, local_dir).split(os.sep)), storage)
