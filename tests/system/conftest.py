"""Fixtures of the system suite (tests/system): a restartable S3 server, and the jobs run once against
S3 in a process of their own (the tiny checkpoint and the shared synthetic features come from
tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulators import S3, free_port

from capray import synthetic
from capray.config import load_config

REPO = Path(__file__).resolve().parents[2]


class RestartableS3(S3):
    """A moto S3 server of its own, which a test may stop and start again on the same port.

    moto keeps buckets in process-wide backends, not in the server thread: a restart keeps them,
    as a real object store keeps its data across an outage.
    """

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
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


@pytest.fixture
def restartable_s3() -> Iterator[RestartableS3]:
    """A moto server the test may stop and restart."""
    server = RestartableS3()
    yield server
    server.stop()


@dataclasses.dataclass
class JobsOnS3:
    """What `capray extract`, `train` and `caption` left, run one after the other against S3 in one
    process of their own with a Ray instance of their own (RAY_TMPDIR under `root`), as a user runs
    them: their console, every local file (Ray's session logs among them) and the bucket."""

    s3: object
    bucket: str
    root: Path
    console: bytes
    secrets: tuple[str, str]  # (the config's secret key, the environment's)
    args: list[str]  # the jobs' config file and overrides

    def config(self):
        """The jobs' config, as they loaded it."""
        return load_config(self.args[0], self.args[1:])


@pytest.fixture(scope="session")
def jobs_on_s3(s3) -> Iterator[JobsOnS3]:
    """The jobs' run once for the tests of what they write (test_security.py, test_job_logs.py,
    test_train_on_s3.py): one Ray start-up and one TensorFlow import for all of them. Training has
    2 workers and 2 epochs with the optional loss extras. A distinctive secret key is in the
    config and another in the environment."""
    config_secret = f"cfgsecret{uuid.uuid4().hex}"
    env_secret = f"envsecret{uuid.uuid4().hex}"
    bucket = s3.bucket(f"sec-{uuid.uuid4().hex[:8]}")
    root = Path(tempfile.mkdtemp(prefix="crjobs"))  # short: Ray's socket paths live under it
    try:
        synthetic.generate(root / "heldout", 4, seed=7, prefix="h")
        args = [
            str(REPO / "configs/demo.yaml"),
            f"work_dir={bucket}/work",
            f"data.annotations={root}/data/captions.csv",
            "data.synthetic_images=32",
            "train.epochs=2",
            "train.batch_size=8",
            # The optional extras run under MultiWorkerMirroredStrategy too.
            "train.attention_reg=1.0",
            "train.clip_norm=5.0",
            "ray.num_workers=2",
            "ray.cpus_per_worker=0.5",
            "ray.local_cpus=2",
            f"storage.endpoint_url={s3.endpoint_url}",
            "storage.region=us-east-1",
            "storage.access_key_id=capraykey",
            f"storage.secret_access_key={config_secret}",
        ]
        script = textwrap.dedent(f"""
            import sys
            from capray import cli
            args = {args!r}
            for job, extra in (("extract", []), ("train", []), ("caption", ["caption.input={root}/heldout/images"])):
                code = cli.main(args + extra, job=job)
                if code:
                    sys.exit(code)
            sys.exit(cli.main(args + ["--print-config"], job="train"))
        """)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CAPRAY_DEBUG")}
        env.update(
            PYTHONPATH=str(REPO),
            RAY_TMPDIR=str(root / "ray"),
            AWS_ACCESS_KEY_ID="envkey",
            AWS_SECRET_ACCESS_KEY=env_secret,
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, timeout=540)
        console = done.stdout + done.stderr
        assert done.returncode == 0, console[-3000:].decode(errors="replace")
        yield JobsOnS3(s3, bucket, root, console, (config_secret, env_secret), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
