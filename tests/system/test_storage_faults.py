"""Storage faults: the S3 server stops in the middle of the caption job's writes, then comes back;
a re-run killed after it started, and one to the end. `capray status` of the output on S3 while
the first job runs, after the kill, and at the end.

The jobs run as users run them, `capray caption ...` in a process with its own Ray instance.
(In one long-lived driver, a failed Ray Data job's actors can outlive it until garbage-collected -
ray-project/ray#24948 - and starve a re-run on a 2-CPU instance.)
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from proctree import kill_job, wait_for_ray_to_exit

from capray import synthetic
from capray.progress import read_heartbeat
from capray.status import read_status

# A caption job through an S3 outage, then two re-runs.
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 24
OUTPUT = "s3://outage/captions"


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` except the empty `prefix/` folder marker pyarrow creates."""
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if k != prefix}


def _images(objects: dict[str, bytes]) -> list[str]:
    return [
        img
        for key, data in objects.items()
        if key.endswith(".parquet") and not any(part.startswith("_") for part in key.split("/"))
        for img in pq.read_table(io.BytesIO(data))["image"].to_pylist()
    ]  # shard files: not the index (_shards.parquet) nor the job's roll-up (_status/stats.parquet)


def test_outage_mid_write_leaves_only_complete_files_and_a_rerun_finishes_exactly_once(
    restartable_s3, tiny_checkpoint: str, tmp_path: Path
) -> None:
    s3 = restartable_s3
    s3.client().create_bucket(Bucket="outage")
    storage_cfg = s3.config().storage
    synthetic.generate(tmp_path / "in", N_IMAGES, seed=3, prefix="o")
    # Two rows per file: the job writes a dozen objects, so the outage lands between writes.
    cmd = [
        sys.executable,
        "-m",
        "capray.cli",
        "caption",
        f"checkpoint={tiny_checkpoint}",
        f"caption.input={tmp_path / 'in' / 'images'}",
        f"output={OUTPUT}",
        "caption.batch_size=2",
        "inputs.shard_rows=2",
        "ray.local_cpus=2",
        f"storage.endpoint_url={s3.endpoint_url}",
        "storage.region=us-east-1",
        "storage.access_key_id=testing",
        "storage.secret_access_key=testing",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # a file: an unread pipe would block the job
        # Few, short retries: the outage lasts until this job has failed, so longer ones would
        # only wait (the defaults took about 2 minutes to give up).
        first_cmd = [*cmd, "storage.retries=1", "storage.retry_wait_s=0.1"]
        proc = subprocess.Popen(first_cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline and not _images(_objects(s3, "outage", "captions/")):
            time.sleep(0.2)
        assert proc.poll() is None, f"the job ended before the outage: {log.read_text()[-2000:]}"
        # `capray status` of the running job on S3, from the bucket alone.
        running = read_status(OUTPUT, storage_cfg)
        s3.stop()
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s3.start()
    first = log.read_text()
    assert running["job"]["state"] == "running" and running["job"]["alive"], (running["job"], running["shards"])
    # The plan's shards: `inputs.shard_rows` is a target, so 10-13 of 24 images here, not exactly 12.
    total = running["shards"]["total"]
    assert 1 <= running["shards"]["done"] < total and total > N_IMAGES // 4, (running["job"], running["shards"])

    # Either outcome is allowed; a failure must say what happened and what to do.
    if proc.returncode:
        assert "CaptionJobError: caption job stopped before every shard was written to s3://outage/captions" in first
        assert "re-run the same command" in first
    else:
        assert f"({N_IMAGES} rows:" in first
    # Whatever is visible is complete: every object is a readable Parquet file of this job.
    after_outage = _objects(s3, "outage", "captions/")
    assert all(
        (k.startswith("captions/") and k.endswith(".parquet"))
        or k == "captions/_capray_config.yaml"
        or k.startswith("captions/_status/")  # the job's roll-up and heartbeat (`capray status`)
        for k in after_outage
    ), sorted(after_outage)
    seen = _images(after_outage)
    assert 0 < len(seen) == len(set(seen)) <= N_IMAGES

    # A re-run killed (SIGKILL, every process of it) once its driver has written its
    # heartbeat, before it gives out shards: seen an hour later, the job is lost, not alive, and
    # its shards done are the files in the bucket. (The outage leaves shards to do: a job that
    # cannot write cannot finish.)
    assert len(seen) < N_IMAGES, "the first job wrote every shard before the outage"
    wait_for_ray_to_exit(log)
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as out:
        killed = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while killed.poll() is None and time.monotonic() < deadline:
            beat = read_heartbeat(OUTPUT, storage_cfg)
            if beat and beat["pid"] == killed.pid:
                break
            time.sleep(0.2)  # polling the bucket: the heartbeat object is the event
        assert killed.poll() is None, f"the re-run ended before it was killed: {killed_log.read_text()[-2000:]}"
    finally:
        kill_job(killed)  # returns once its Ray instance is gone too
    kept = _objects(s3, "outage", "captions/")
    files = [k for k in kept if k.endswith(".parquet") and not any(part.startswith("_") for part in k.split("/"))]
    kept_images = _images(kept)
    lost = read_status(OUTPUT, storage_cfg, now=time.time() + 3600)
    assert lost["job"]["state"] == "lost" and not lost["job"]["alive"] and lost["eta_s"] is None, lost
    assert lost["shards"]["done"] == len(files) and lost["shards"]["total"] == total, lost
    assert lost["shards"]["stats_unknown"] == 0 and lost["rows"]["done"] == len(kept_images) >= len(seen), lost

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    final = _images(_objects(s3, "outage", "captions/"))
    assert sorted(final) == sorted(str(p) for p in (tmp_path / "in" / "images").glob("*.jpg"))
    assert len(final) == N_IMAGES  # every image exactly once
    # The re-run did exactly the shards without a file.
    assert f"already done ({len(kept_images)} images)" in rerun.stdout, rerun.stdout[-2000:]
    assert f"({N_IMAGES - len(kept_images)} rows:" in rerun.stdout, rerun.stdout[-2000:]
    done = read_status(OUTPUT, storage_cfg)
    assert done["job"]["state"] == "finished" and done["shards"]["done"] == done["shards"]["total"] == total
    assert done["rows"]["done"] == done["rows"]["ok"] == N_IMAGES and done["eta_s"] == 0.0, done
