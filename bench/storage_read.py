"""Object storage, side by side on local emulators: S3 (moto), Google Cloud Storage
(fake-gcs-server) and Azure Blob (Azurite, `make node_modules/.bin/azurite-blob`).

On each store: one object of --mb megabytes read by `capray.storage.read_bytes`, and a prefix of
--objects objects listed by `capray.listing.walk` (streamed page by page), wall time of each. On
S3 also pyarrow's input stream and input file `read()` (capray's reads before issue 12 and before
2026-11-30), with the requests (GET and HEAD) of each, and --small image-sized objects read by 8 threads
through the input file and through read_bytes.
The emulators share this machine's CPUs with the client: the figures compare capray's paths on
each store, not the services.

    .venv/bin/python bench/storage_read.py [--mb 88] [--objects 10000] [--small 1000] [--stores s3,gcs,azure]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from audit import cpu_model
from moto_s3 import bench_settings, moto_server

from capray import listing, storage
from capray.config import load_config

# The emulators the tests start (one home for how to run them).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from emulators import Emulator

SMALL = 135_000  # bytes: the Flickr photos' average size


def s3_reads(uri: str, cfg, data: bytes, requests_seen) -> None:
    """The same object read three ways: pyarrow's S3 input stream and input file, and
    `read_bytes` (one botocore GET of the whole object, the one version-safe read)."""
    fs, path = storage.filesystem(uri, cfg.storage)

    def stream() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    def file() -> bytes:  # a HEAD for the size, then a ranged GET (capray until 2026-11-30)
        with fs.open_input_file(path) as f:
            return f.read()

    times = {}
    for name, read in (
        ("pyarrow input stream read()", stream),
        ("pyarrow input file read()", file),
        ("read_bytes (one GET)", lambda: storage.read_bytes(uri, cfg.storage)),
    ):
        requests_seen.count = 0
        t0 = time.perf_counter()
        got = read()
        times[name] = time.perf_counter() - t0
        assert got == data
        print(f"  s3 {name:30s} {times[name]:7.2f} s  {requests_seen.count:4d} requests")
    stream_s, file_s, one_s = times.values()
    print(f"  s3 stream / read_bytes time: {stream_s / one_s:.1f}x; input file / read_bytes: {file_s / one_s:.2f}x")


def s3_small_reads(bucket: str, cfg, keys: list[str], requests_seen, threads: int = 8) -> None:
    """Image-sized objects read by `threads` threads, as a caption actor's I/O pool reads them:
    pyarrow's input file (a HEAD and a GET each) against `read_bytes` (one GET), best of 2 each."""
    fs, _ = storage.filesystem(bucket, cfg.storage)

    def file(uri: str) -> bytes:
        with fs.open_input_file(uri[len("s3://") :]) as f:
            return f.read()

    best: dict[str, float] = {}
    requests: dict[str, int] = {}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(2):
            for name, read in (
                ("pyarrow input file read()", file),
                ("read_bytes (one GET)", lambda uri: storage.read_bytes(uri, cfg.storage)),
            ):
                requests_seen.count = 0
                t0 = time.perf_counter()
                assert all(len(b) == SMALL for b in pool.map(read, keys))
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                requests[name] = requests_seen.count
    for name, s in best.items():
        print(
            f"  s3 {len(keys)} objects of {SMALL // 1000} kB, {threads} threads, {name:26s}"
            f" {len(keys) / s:6.0f} objects/s  {requests[name]} requests"
        )
    file_s, one_s = best.values()
    print(f"  s3 small objects: read_bytes / input file objects/s: {file_s / one_s:.2f}x")


def measure(store: str, bucket: str, cfg, data: bytes, objects: int) -> tuple[float, float]:
    """(seconds to read the object, seconds to list the prefix of `objects` objects)."""
    uri = f"{bucket}/object.bin"
    keys = [f"{bucket}/many/{i // 100:03d}/{i:06d}.jpg" for i in range(objects)]
    if store == "s3":
        # One PUT each through botocore: write_bytes adds a folder marker per object on S3, and
        # pyarrow's multipart upload of a large object to moto in this same process stalls.
        client, name = storage.s3_client(cfg.storage), bucket[len("s3://") :]
        put = lambda k, body=b"x": client.put_object(Bucket=name, Key=k[len(bucket) + 1 :], Body=body)
    else:
        put = lambda k, body=b"x": storage.write_bytes(k, body, cfg.storage)
    put(uri, data)
    with ThreadPoolExecutor(8) as pool:  # moto serves from this process: more threads only queue
        list(pool.map(put, keys))
    # Clients built and connected before the clock starts: the figures are a warm process's.
    storage.read_bytes(keys[0], cfg.storage)
    sum(1 for _ in listing.walk(f"{bucket}/many/000", cfg.storage, recursive=True))
    t0 = time.perf_counter()
    assert storage.read_bytes(uri, cfg.storage) == data
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    listed = sum(1 for _ in listing.walk(f"{bucket}/many", cfg.storage, recursive=True))
    list_s = time.perf_counter() - t0
    assert listed == objects, (store, listed)
    print(f"  {store:6s} read {read_s:7.2f} s   list {list_s:7.2f} s")
    return read_s, list_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=88, help="object size (88 MB: an InceptionV3 .h5)")
    parser.add_argument("--objects", type=int, default=10_000, help="objects under the listed prefix")
    parser.add_argument("--small", type=int, default=1000, help="image-sized S3 objects read by 8 threads")
    parser.add_argument("--stores", default="s3,gcs,azure")
    args = parser.parse_args()
    print(f"cpu: {cpu_model()} ({os.cpu_count()} CPUs)")
    print(f"one object of {args.mb} MB read; a prefix of {args.objects} objects listed")
    data = os.urandom(args.mb * 1_000_000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores.split(","):
            if store == "s3":
                with moto_server(lambda msg: "GET /" in msg or "HEAD /" in msg) as (endpoint, requests_seen):
                    cfg = load_config(None, bench_settings(endpoint))
                    results[store] = measure(store, "s3://bench", cfg, data, args.objects)
                    s3_reads("s3://bench/object.bin", cfg, data, requests_seen)
                    small = [f"s3://bench/small/{i:04d}.jpg" for i in range(args.small)]
                    put = storage.s3_client(cfg.storage).put_object
                    body = os.urandom(SMALL)
                    for uri in small:
                        put(Bucket="bench", Key=uri[len("s3://bench/") :], Body=body)
                    s3_small_reads("s3://bench", cfg, small, requests_seen)
                continue
            server = Emulator(store, Path(tmp) / store).start()
            try:
                results[store] = measure(store, server.bucket("bench"), server.config(), data, args.objects)
            finally:
                server.stop()
    print("\n| store | read one object | list the prefix |\n|---|---|---|")
    for store, (read_s, list_s) in results.items():
        print(f"| {store} | {read_s:.2f} s | {list_s:.2f} s |")


if __name__ == "__main__":
    main()
