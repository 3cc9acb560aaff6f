"""Storage under load and under faults: one S3 client per process, transient errors retried.

Against real S3-protocol servers (moto): the session's, and one of this module's own that
`test_an_s3_outage_mid_job_loses_no_image` stops and restarts in the middle of a caption job.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from emulators import S3
from imagezoo import TEST_MAX_PIXELS, good_images

from capray import inputs, storage
from capray.captioning import caption
from capray.worker import ShardWorker


class Echo:
    """A stand-in model for the worker: one row per image, its decode error if any."""

    def __call__(self, batch: dict) -> pa.Table:
        return pa.table(
            {"image": list(batch["image"]), "error": pa.array([e or None for e in batch["error"]], pa.string())}
        )


SCHEMA = pa.schema([("image", pa.string()), ("error", pa.string())])


def test_one_s3_client_per_process_however_many_reads(s3, tmp_path: Path) -> None:
    bucket = s3.bucket("clients")
    cfg = s3.config(f"work_dir={tmp_path / 'work'}", "inputs.shard_rows=20", f"data.max_pixels={TEST_MAX_PIXELS}")
    image = good_images()["scene.jpg"]
    uris = [f"{bucket}/img/{i:03d}.jpg" for i in range(60)]
    for uri in uris:
        storage.write_bytes(uri, image, cfg.storage)
    assert storage.filesystem(uris[0], cfg.storage)[0] is storage.filesystem(uris[1], cfg.storage)[0]
    before = storage.filesystems_built()
    plan = inputs.images_plan(uris, str(tmp_path / "plan"), cfg, "clients")
    worker = ShardWorker([s.to_row() for s in plan.shards], f"{bucket}/out", cfg, Echo, {}, 8, SCHEMA)
    rows = [worker.process(shard) for shard in plan.shards]  # 60 reads and an upload per shard, io_threads at once
    assert len(plan.shards) > 1 and sum(r["rows"] for r in rows) == 60 and sum(r["failed"] for r in rows) == 0
    # The endpoint's two clients, pyarrow's (writes) and botocore's (reads); fewer if this process had them.
    assert storage.filesystems_built() - before <= 2


def test_without_credentials_a_public_bucket_is_read_and_listed_unsigned(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow's S3 client sends unsigned requests when it finds no credentials; botocore's raised
    NoCredentialsError, so reads and listings of a public bucket failed where pyarrow's did not."""
    from capray import listing
    from capray.config import load_config

    bucket = s3.bucket("public")
    storage.write_bytes(f"{bucket}/a/x.txt", b"open data", s3.config().storage)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance profile to ask
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    anonymous = load_config(None, [f"storage.endpoint_url={s3.endpoint_url}", "storage.region=us-east-1"]).storage
    assert storage.read_bytes(f"{bucket}/a/x.txt", anonymous) == b"open data"
    assert [e.uri for e in listing.walk(f"{bucket}/a", anonymous)] == [f"{bucket}/a/x.txt"]


def test_transient_errors_are_retried_and_others_are_not() -> None:
    cfg = S3("http://127.0.0.1:1").config("storage.retries=3", "storage.retry_wait_s=0.01").storage
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect")
        return "ok"

    before = storage.retried()
    assert storage.retrying(flaky, "test", cfg) == "ok" and len(calls) == 3 and storage.retried() - before == 2

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retrying(missing, "test", cfg)
    assert len(calls) == 1  # a missing key is not going to appear by trying again

    def down() -> None:
        raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")

    with pytest.raises(OSError, match=r"gave up after 4 tries"):
        storage.retrying(down, "test", cfg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_s3_outage_mid_job_loses_no_image(tiny_checkpoint: str, ray_local, tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3(f"http://127.0.0.1:{port}")
        bucket = s3.bucket("flaky")
        cfg = s3.config(
            f"work_dir={tmp_path / 'work'}",
            "inputs.shard_rows=8",
            "caption.batch_size=4",
            f"data.max_pixels={TEST_MAX_PIXELS}",
            "storage.retries=6",
            "storage.retry_wait_s=0.5",
        )
        images = list(good_images().values())
        for i in range(64):
            storage.write_bytes(
                f"{bucket}/photos/{i:03d}.jpg" if i % 2 else f"{bucket}/photos/{i:03d}.png",
                images[i % len(images)],
                cfg.storage,
            )
        out = tmp_path / "captions"
        result: dict = {}
        job = threading.Thread(
            target=lambda: result.update(caption(cfg, tiny_checkpoint, f"{bucket}/photos", str(out)))
        )
        job.start()
        # The outage starts when the first of ~8 shards is written (not the index, `_shards.parquet`,
        # written before any work), so the others are read
        # while the server is down or just after.
        deadline = time.time() + 300
        while not (out.is_dir() and any(p.suffix == ".parquet" and not p.name.startswith("_") for p in out.iterdir())):
            assert job.is_alive() and time.time() < deadline, "the job ended or stalled before its first file"
            time.sleep(0.05)
        server.stop()
        time.sleep(3)  # the outage itself, not a synchronisation
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto keeps its buckets in this process: the same objects are back
        job.join(timeout=300)
        assert not job.is_alive()
    finally:
        server.stop()
    assert result["written"] == 64 and result["failed"] == 0, result
    assert result["retried"] > 0  # the outage did hit reads, and they were tried again
    rows = pd.read_parquet(out)
    assert len(rows) == 64 and rows["error"].isna().all() and rows["image"].nunique() == 64
