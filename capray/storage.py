"""Local paths and s3:// URIs behind one small API (pyarrow filesystems).

Everything that reads or writes outputs goes through here so that a job runs unchanged on a
laptop folder or an object-storage bucket. Credentials come from the config's `storage` section
or, when that is empty, from the standard AWS environment variables / instance profile.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path components for local paths and URIs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def filesystem(uri: str, storage: Any = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
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
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]


def exists(uri: str, storage: Any = None) -> bool:
    """Whether a file or directory exists at `uri`."""
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: Any = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, storage)
    # A random-access file reads its known size in one GET; pyarrow's S3 input *stream* read()
    # fetches it in hundreds of small ranged GETs instead (bench/storage_read.py).
    with fs.open_input_file(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: Any = None) -> None:
    """Write one file so that readers never see it half-written (temp name, then rename)."""
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if is_remote(uri):
        # An S3 object, single or multipart upload, only becomes visible once complete.
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def upload_file(local_path: str, uri: str, storage: Any = None) -> None:
    """Copy a local file to `uri`, streamed; an S3 object only becomes visible once complete."""
    fs, path = filesystem(uri, storage)
    fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), recursive=True)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


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
