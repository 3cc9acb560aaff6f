"""Reading one large S3 object: pyarrow's input stream `read()` (capray before) against the
random-access file `read()` that `capray.storage.read_bytes` uses, side by side on a local
S3-protocol server (moto), same object. Prints seconds and GET requests of each.

    .venv/bin/python bench/storage_read.py [--mb 88]
"""

from __future__ import annotations

import argparse
import os
import time

from moto_s3 import bench_settings, moto_server

from capray import storage
from capray.config import load_config


def main() -> None:
    """Time both ways of reading one object of --mb megabytes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=88, help="object size (88 MB: an InceptionV3 .h5)")
    args = parser.parse_args()
    with moto_server(lambda msg: "GET /" in msg) as (endpoint, gets):
        cfg = load_config(None, bench_settings(endpoint))
        data = os.urandom(args.mb * 1_000_000)
        uri = "s3://bench/object.bin"
        storage.write_bytes(uri, data, cfg.storage)
        fs, path = storage.filesystem(uri, cfg.storage)
        results = {}
        for name, open_ in (("input stream read()", fs.open_input_stream), ("read_bytes (input file read())", None)):
            gets.count = 0
            t0 = time.perf_counter()
            if open_ is None:
                got = storage.read_bytes(uri, cfg.storage)
            else:
                with open_(path) as f:
                    got = f.read()
            seconds = time.perf_counter() - t0
            assert got == data
            results[name] = seconds
            print(f"{name:32s} {seconds:7.2f} s  {gets.count:4d} GET requests  ({args.mb} MB)")
        stream, file_ = results.values()
        print(f"stream / read_bytes time: {stream / file_:.1f}x")


if __name__ == "__main__":
    main()
