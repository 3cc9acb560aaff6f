"""Reading one large S3 object: pyarrow's input stream `read()` (capray before) against the
random-access file `read()` that `capray.storage.read_bytes` uses, side by side on a local
S3-protocol server (moto), same object. Prints seconds and GET requests of each.

    .venv/bin/python bench/storage_read.py [--mb 88]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time

from moto.server import ThreadedMotoServer

from capray import storage
from capray.config import load_config


class _Gets(logging.Handler):
    """Counts the GET requests the moto server logs (werkzeug's access log)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "GET /" in record.getMessage()  # the method may come wrapped in colour codes


def main() -> None:
    """Time both ways of reading one object of --mb megabytes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=88, help="object size (88 MB: an InceptionV3 .h5)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    gets = _Gets()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(gets)
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False  # count the access log, do not print it
    try:
        cfg = load_config(None, [f"storage.endpoint_url=http://127.0.0.1:{port}", "storage.region=us-east-1",
                                 "storage.access_key_id=bench", "storage.secret_access_key=bench"])
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="bench")
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
    finally:
        server.stop()


if __name__ == "__main__":
    main()
