"""A local S3-protocol server (moto) for benchmarks, with a count of the requests it serves."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RequestCounter(logging.Handler):
    """Counts the requests the moto server logs (werkzeug's access log) that `match` accepts."""

    def __init__(self, match: Callable[[str], bool]):
        super().__init__()
        self.match, self.count = match, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += bool(self.match(record.getMessage()))  # the method may come wrapped in colour codes


@contextmanager
def moto_server(match: Callable[[str], bool]) -> Iterator[tuple[str, RequestCounter]]:
    """(endpoint URL, counter of matching requests) of a moto server with a bucket `bench`."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    counter = RequestCounter(match)
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(counter)
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False  # count the access log, do not print it
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="bench")
        yield endpoint, counter
    finally:
        werkzeug.removeHandler(counter)
        server.stop()


def bench_settings(endpoint: str) -> list[str]:
    """capray config overrides that reach the server."""
    return [
        f"storage.endpoint_url={endpoint}",
        "storage.region=us-east-1",
        "storage.access_key_id=bench",
        "storage.secret_access_key=bench",
    ]
