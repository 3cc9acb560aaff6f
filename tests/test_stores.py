"""The three object stores behind one API: s3:// (moto), gs:// (fake-gcs-server) and az://, abfs://
(Azurite), each a real server on 127.0.0.1 started by tests/conftest.py.

Round trips, one client per process, concurrent reads, listings that stream page by page, the
configuration each store takes (credentials never saved), a dropped connection retried and an
object rewritten while it is read. The
jobs on each store (a caption job over a prefix with work_dir on the store, resumed; extraction)
are in test_input_kinds.py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from emulators import S3, Emulator, free_port

from capray import listing, storage
from capray.config import to_yaml

STORES = ["s3", "gcs", "azure"]


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest):
    """Each store's session server (the `s3`, `gcs` and `azure` fixtures)."""
    return request.getfixturevalue(request.param)


def test_every_operation_on_every_store_with_one_client_per_process(server, request, tmp_path: Path) -> None:
    name = f"ops-{request.node.callspec.id}"
    bucket, cfg = server.bucket(name), server.config()
    before = storage.filesystems_built()
    data = {f"{bucket}/in/{i:03d}.bin": bytes([i]) * (1000 + i) for i in range(40)}
    storage.write_bytes(next(iter(data)), b"first", cfg.storage)
    # Concurrent writes and reads through the one client, as the caption job's I/O threads do.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: storage.write_bytes(kv[0], kv[1], cfg.storage), data.items()))
        read = dict(zip(data, pool.map(lambda uri: storage.read_bytes(uri, cfg.storage), data)))
    assert read == data  # the second write of the first key replaced it whole
    # One client for this store and endpoint; on S3 two: pyarrow's (writes) and botocore's (reads).
    assert storage.filesystems_built() - before <= (2 if request.node.callspec.id == "s3" else 1)
    assert storage.filesystem(bucket, cfg.storage)[0] is storage.filesystem(f"{bucket}/x", cfg.storage)[0]

    assert storage.exists(f"{bucket}/in", cfg.storage) and storage.exists(f"{bucket}/in/000.bin", cfg.storage)
    assert not storage.exists(f"{bucket}/in/nothing.bin", cfg.storage)
    assert storage.list_files(f"{bucket}/in", cfg.storage) == sorted(data)
    size, version = listing.stat(f"{bucket}/in/005.bin", cfg.storage)
    entry = next(e for e in listing.walk(f"{bucket}/in", cfg.storage) if e.uri.endswith("005.bin"))
    assert size == entry.size == 1005 and version == entry.version != ""
    storage.write_bytes(f"{bucket}/in/005.bin", b"other", cfg.storage)
    assert listing.stat(f"{bucket}/in/005.bin", cfg.storage)[1] != version  # an overwrite is a new version

    local = tmp_path / "dir"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("a")
    (local / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(local), f"{bucket}/dir", cfg.storage)
    assert storage.list_files(f"{bucket}/dir", cfg.storage) == [f"{bucket}/dir/a.txt", f"{bucket}/dir/sub/b.txt"]
    storage.delete(f"{bucket}/dir/a.txt", cfg.storage)
    storage.delete(f"{bucket}/dir/a.txt", cfg.storage)  # already gone: nothing to do
    storage.delete_dir(f"{bucket}/dir", cfg.storage)
    assert not storage.exists(f"{bucket}/dir", cfg.storage)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/in/nothing.bin", cfg.storage)


def test_a_listing_streams_page_by_page_in_key_order(server, request, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, cfg = server.bucket(f"pages-{request.node.callspec.id}"), server.config()
    names = ["a.jpg", "b.jpg", "c.jpg", "d/1.jpg", "d/2.jpg", "e.jpg", "f.jpg", "g.jpg", "h.jpg"]
    for n in names:
        storage.write_bytes(f"{bucket}/p/{n}", b"x", cfg.storage)
    monkeypatch.setattr(listing, "PAGE_SIZE", 3)
    walk = listing.walk(f"{bucket}/p", cfg.storage, recursive=True)
    first = [next(walk).uri for _ in range(3)]
    # Written after the first page came: a later page, requested only now, has it.
    storage.write_bytes(f"{bucket}/p/z.jpg", b"x", cfg.storage)
    rest = [e.uri for e in walk]
    assert first + rest == [f"{bucket}/p/{n}" for n in names + ["z.jpg"]]
    top = [(e.uri.rsplit("/", 1)[1], e.is_dir) for e in listing.walk(f"{bucket}/p", cfg.storage, recursive=False)]
    # A folder once, where its name + "/" sorts (fake-gcs-server repeats it on every page).
    assert top == [(n, False) for n in ("a.jpg", "b.jpg", "c.jpg")] + [("d", True)] + [
        (n, False) for n in ("e.jpg", "f.jpg", "g.jpg", "h.jpg", "z.jpg")
    ]


def test_abfs_is_az_and_the_store_keys_are_config_not_saved(azure: Emulator, gcs: Emulator) -> None:
    bucket, cfg = azure.bucket("alias"), azure.config(*gcs.settings)
    storage.write_bytes(f"{bucket}/x.txt", b"same", cfg.storage)
    assert storage.read_bytes("abfs://alias/x.txt", cfg.storage) == b"same"
    saved = to_yaml(cfg)
    assert azure.AZURE_KEY not in saved and "azure_account_key: ''" in saved and "gcs_token: ''" in saved
    assert azure.endpoint_url in saved and gcs.endpoint_url in saved  # endpoints are not secrets


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, gcs: Emulator) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "adlfs", None)  # as if `capray[azure]` were not installed
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    with pytest.raises(
        ImportError, match=r"^azure URIs need adlfs, which is not installed: pip install 'capray\[azure\]'$"
    ):
        storage.read_bytes("az://c/x", gcs.config("storage.azure_account_name=nobody").storage)


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_a_dropped_connection_is_retried_until_the_store_answers(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's port first answers with a dropped connection, then the emulator takes it over:
    the read in flight is tried again (by the store's client or capray.storage) and succeeds."""
    first = Emulator(kind, tmp_path / "data").start()
    try:
        bucket, cfg = first.bucket("fault"), first.config("storage.retries=6", "storage.retry_wait_s=0.2")
        storage.write_bytes(f"{bucket}/x.bin", b"kept", cfg.storage)
    finally:
        first.stop()
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})  # a fresh client, as a new process has
    read = partial(storage.read_bytes, f"{bucket}/x.bin", cfg.storage)
    assert _through_a_dropped_connection(first.port, read, Emulator(kind, first.data, first.port).start) == b"kept"


def _through_a_dropped_connection(port: int, work: Callable[[], Any], take_over: Callable[[], Any]) -> Any:
    """`work()`, run while the store's port first drops the connection it gets and then
    `take_over()` starts the store on it again (returning what has `stop`); work's result."""
    dropper = socket.socket()
    dropper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the store's closed connections linger
    dropper.bind(("127.0.0.1", port))
    dropper.listen()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(got=work()))
    worker.start()
    conn, _ = dropper.accept()  # the request reached the store: drop it, and hand the port over
    conn.close()
    dropper.close()
    server = take_over()
    try:
        worker.join(timeout=120)
        assert not worker.is_alive()
    finally:
        server.stop()
    return result["got"]


@pytest.mark.parametrize("operation", ["read", "listing"])
def test_an_s3_read_or_listing_is_retried_until_the_store_answers(operation: str, monkeypatch) -> None:
    """As above on S3, whose botocore client retries nothing itself: the port first drops the
    connection, then a moto server takes it over (moto keeps its objects in this process)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    first = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    first.start()
    try:
        store = S3(f"http://127.0.0.1:{port}")
        bucket = store.bucket(f"fault-{operation}")
        cfg = store.config("storage.retries=6", "storage.retry_wait_s=0.2")
        storage.write_bytes(f"{bucket}/p/x.bin", b"kept", cfg.storage)
    finally:
        first.stop()
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})  # a fresh client, as a new process has
    if operation == "read":
        work, expected = partial(storage.read_bytes, f"{bucket}/p/x.bin", cfg.storage), b"kept"
    else:
        work, expected = lambda: [e.uri for e in listing.walk(f"{bucket}/p", cfg.storage)], [f"{bucket}/p/x.bin"]

    def take_over() -> ThreadedMotoServer:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server

    retried = storage.retried()
    assert _through_a_dropped_connection(port, work, take_over) == expected
    assert storage.retried() > retried  # by capray.storage: botocore's client retries nothing


def test_each_stores_transient_errors_are_recognised() -> None:
    from aiohttp import ClientConnectionError, ServerDisconnectedError
    from azure.core.exceptions import ResourceModifiedError, ServiceRequestError, ServiceResponseError
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, IncompleteReadError
    from gcsfs.retry import HttpError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "ListObjectsV2")

    # As the clients raise them: gcsfs builds HttpError from the response's JSON error.
    transient = [
        HttpError({"code": 503, "message": "backend error"}),
        HttpError({"code": 429, "message": "rate limit exceeded"}),
        ServiceRequestError("connection refused"),
        ServiceResponseError("connection reset before the response"),
        ServerDisconnectedError(),
        ClientConnectionError("reset"),
        OSError("AWS Error SLOW_DOWN during GetObject operation"),
        client_error(503, "SlowDown"),
        storage.StoreError("s3://b/k: InternalError", 500),
        ConnectionClosedError(endpoint_url="http://s3"),
        EndpointConnectionError(endpoint_url="http://s3"),
        IncompleteReadError(actual_bytes=3, expected_bytes=9),
        ResourceModifiedError("the blob changed between chunks"),
    ]
    permanent = [
        HttpError({"code": 403, "message": "forbidden"}),
        HttpError({"code": 400, "message": "invalid argument"}),
        client_error(403, "AccessDenied"),
        storage.StoreError("s3://b/k: InvalidRange", 416),
        FileNotFoundError("gone"),
        PermissionError("denied"),
        ValueError("not storage"),
    ]
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)
    assert [storage.is_transient(e) for e in permanent] == [False] * len(permanent)


def test_an_object_rewritten_while_it_is_read_is_read_whole(server, request) -> None:
    """A reader never gets a mix of two versions of an object (`capray status` reads the heartbeat a
    running job rewrites every 30 s; inputs get overwritten in place). The random-access files of
    pyarrow (S3) and fsspec (GCS, Azure) take the size from one request and the bytes from
    another: a rewrite in between read the new content cut short or, on S3, padded with stray
    memory, in this test on every store."""
    bucket, cfg = server.bucket(f"rewrite-{request.node.callspec.id}"), server.config()
    uri = f"{bucket}/heartbeat.json"
    versions = (b'{"shards": 1}', b'{"shards": 22, "images": 4444444}')  # two lengths
    storage.write_bytes(uri, versions[0], cfg.storage)
    stop = threading.Event()

    def rewrite() -> None:
        i = 1
        while not stop.is_set():
            storage.write_bytes(uri, versions[i % 2], cfg.storage)
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [storage.read_bytes(uri, cfg.storage) for _ in range(200)]
    finally:
        stop.set()
        writer.join()
    assert {r for r in reads if r not in versions} == set()
