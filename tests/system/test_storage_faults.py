"""Storage faults: the S3 server stops in the middle of the caption job's writes, then comes back."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from capray import synthetic
from capray.infer import CaptionJobError, caption

N_IMAGES = 24


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` except the empty `prefix/` folder marker pyarrow creates."""
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if k != prefix}


def test_outage_mid_write_leaves_only_complete_files_and_a_rerun_finishes_exactly_once(
    restartable_s3, tiny_checkpoint: str, tmp_path: Path, ray_local
) -> None:
    s3 = restartable_s3
    s3.client().create_bucket(Bucket="outage")
    synthetic.generate(tmp_path / "in", N_IMAGES, seed=3, prefix="o")
    inputs, out = str(tmp_path / "in" / "images"), "s3://outage/captions"
    # Two rows per file: the job writes a dozen objects, so the outage lands between writes.
    cfg = s3.config("infer.batch_size=2", "infer.rows_per_file=2")
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["summary"] = caption(cfg, tiny_checkpoint, inputs, out)
        except Exception as e:  # recorded and checked below
            outcome["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline and not _objects(s3, "outage", "captions/"):
        time.sleep(0.2)
    assert thread.is_alive(), f"the job ended before the outage: {outcome}"
    s3.stop()
    thread.join(timeout=400)
    assert not thread.is_alive(), "the job hung after the storage outage"
    s3.start()

    # Either outcome is allowed; a failure must say what happened and what to do.
    if "error" in outcome:
        err = outcome["error"]
        assert isinstance(err, CaptionJobError), repr(err)
        assert f"written to {out}" in str(err) and "re-run the same command" in str(err)
    else:
        assert outcome["summary"]["written"] == N_IMAGES
    # Whatever is visible is complete: every object is a readable Parquet file of this job.
    after_outage = _objects(s3, "outage", "captions/")
    assert after_outage and all(k.startswith("captions/part-") and k.endswith(".parquet") for k in after_outage)
    seen = [img for data in after_outage.values() for img in pq.read_table(io.BytesIO(data))["image"].to_pylist()]
    assert len(seen) == len(set(seen)) <= N_IMAGES

    rerun = caption(cfg, tiny_checkpoint, inputs, out)
    assert rerun["already_done"] == len(seen) and rerun["remaining"] == 0 and rerun["duplicates"] == 0
    final = [img for data in _objects(s3, "outage", "captions/").values()
             for img in pq.read_table(io.BytesIO(data))["image"].to_pylist()]
    assert sorted(final) == sorted(str(p) for p in (tmp_path / "in" / "images").glob("*.jpg"))
    assert len(final) == N_IMAGES  # every image exactly once
