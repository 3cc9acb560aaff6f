"""Object storage, side by side on local emulators: S3 (moto), Google Cloud Storage
(fake-gcs-server) and Azure Blob (Azurite, `make node_modules/.bin/azurite-blob`).

On each store: one object of --mb megabytes read by `capray.storage.read_bytes`, and a prefix of
--objects objects listed by `capray.listing.walk` (streamed page by page), wall time of each. On
S3 also pyarrow's input stream and input file `read()` (capray's reads before issue 12 and before
2026-11-30), with the GET requests of each.
The emulators share this machine's CPUs with the client: the figures compare capray's paths on
each store, not the services.

    .venv/bin/python bench/storage_read.py [--mb 88] [--objects 10000] [--stores s3,gcs,azure]
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


def s3_reads(uri: str, cfg, data: bytes, gets) -> None:
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
        gets.count = 0
        t0 = time.perf_counter()
        got = read()
        times[name] = time.perf_counter() - t0
        assert got == data
        print(f"  s3 {name:30s} {times[name]:7.2f} s  {gets.count:4d} GET requests")
    stream_s, file_s, one_s = times.values()
    print(f"  s3 stream / read_bytes time: {stream_s / one_s:.1f}x; input file / read_bytes: {file_s / one_s:.2f}x")


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
    parser.add_argument("--stores", default="s3,gcs,azure")
    args = parser.parse_args()
    print(f"cpu: {cpu_model()} ({os.cpu_count()} CPUs)")
    print(f"one object of {args.mb} MB read; a prefix of {args.objects} objects listed")
    data = os.urandom(args.mb * 1_000_000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores.split(","):
            if store == "s3":
                with moto_server(lambda msg: "GET /" in msg) as (endpoint, gets):
                    cfg = load_config(None, bench_settings(endpoint))
                    results[store] = measure(store, "s3://bench", cfg, data, args.objects)
                    s3_reads("s3://bench/object.bin", cfg, data, gets)
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
