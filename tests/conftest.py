"""Shared fixtures: a real local Ray instance, a real S3-protocol server (moto) on 127.0.0.1, and
test data built once per session (a tiny checkpoint, extracted synthetic features)."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from builders import extract_synthetic, write_tiny_checkpoint

from capray.config import load_config

REPO = Path(__file__).resolve().parents[1]
FLICKR_DEV = REPO.parent / "shared" / "data" / "flickr8k-dev"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    if os.environ.get("CAPRAY_TEST_FAST"):
        pytest.fail(
            "`make test-fast` runs no Ray: this test belongs in `make test` only (see the Makefile's FAST list)"
        )
    import ray

    from capray.runtime import init_ray

    init_ray(load_config(None, ["ray.local_cpus=2"]))
    yield
    ray.shutdown()


class S3:
    """A moto S3 server on 127.0.0.1 and capray configs wired to it."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.settings = [
            f"storage.endpoint_url={endpoint_url}",
            "storage.region=us-east-1",
            "storage.access_key_id=testing",
            "storage.secret_access_key=testing",
        ]

    def config(self, *overrides: str):
        """A capray config that reaches this server."""
        return load_config(None, [*self.settings, *overrides])

    def bucket(self, name: str) -> str:
        """Create a bucket; returns its s3:// URI."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """A real S3-protocol server (moto's ThreadedMotoServer) for the session."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def flickr_dev() -> Path:
    """../shared/data/flickr8k-dev, or skip when this machine does not have it."""
    if not (FLICKR_DEV / "captions.csv").is_file():
        pytest.skip(f"{FLICKR_DEV} not present")
    return FLICKR_DEV


def _once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per pytest run, also under pytest-xdist (`make test` runs 2 worker
    processes): the first worker to ask builds it under a file lock, the others block on the lock
    and then reuse the folder. Users only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, shared by the workers' own popen-gwK/
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained, complete checkpoint for the tests of the caption job's plumbing."""
    return str(_once_per_run(tmp_path_factory, "tinyckpt", write_tiny_checkpoint))


@pytest.fixture(scope="session")
def synthetic_features(tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    """A work dir with synthetic scenes and their extracted features, made once per run;
    training tests read them through `builders.reuse_features`."""
    return _once_per_run(tmp_path_factory, "synthetic", extract_synthetic)
