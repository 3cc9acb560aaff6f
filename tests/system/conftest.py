"""Fixtures of the system suite (tests/system): a restartable S3 server (the tiny checkpoint and the
shared synthetic features come from tests/conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from capray.config import load_config


class RestartableS3:
    """A moto S3 server of its own, which a test may stop and start again on the same port.

    moto keeps buckets in process-wide backends, not in the server thread: a restart keeps them,
    as a real object store keeps its data across an outage.
    """

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        """Serve on the same port again."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        """Stop serving: clients get connection refused."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        """A boto3 client of this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def config(self, *overrides: str):
        """A capray config that reaches this server."""
        return load_config(
            None,
            [
                f"storage.endpoint_url={self.endpoint_url}",
                "storage.region=us-east-1",
                "storage.access_key_id=testing",
                "storage.secret_access_key=testing",
                *overrides,
            ],
        )


@pytest.fixture
def restartable_s3() -> Iterator[RestartableS3]:
    """A moto server the test may stop and restart."""
    server = RestartableS3()
    yield server
    server.stop()
