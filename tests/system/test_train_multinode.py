"""Training faults the run survives: two Ray Train workers on two nodes of a local cluster, one
worker process killed mid-epoch, then, in the restarted run, one node; each time the run restarts
from its last registered checkpoint, and it completes. (A worker killed without retries:
test_train_faults.py; a whole job killed: test_train_resume.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from builders import reuse_features

from capray.data import load_split

# A three-node cluster and a training run restarted twice: minutes on 2 cores.
pytestmark = pytest.mark.timeout(900)
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EPOCHS, BATCH, EVERY = 3, 8, 2
# 40 of the shared scenes (one caption each), 32 of them for training: 4 steps an epoch and a
# checkpoint every 2 (mid-epoch ones at steps 2, 6 and 10). A worker process is killed once the
# first (step 2) is registered, a node once the restarted run has registered a later mid-epoch
# one (step 6, 6 steps before the end). From the in-memory cache the workers run a few steps a
# second, so the controller polls its workers every 0.2 s instead of 2 s
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, below): it registers the checkpoints, and sees the lost
# workers, that much sooner.
SMALL = [
    "data.num_examples=40",
    f"train.batch_size={BATCH}",
    f"train.epochs={EPOCHS}",
    f"train.checkpoint_every_steps={EVERY}",
    "train.num_to_keep=0",
    "train.max_failures=2",
    "model.embedding_dim=16",
    "model.units=32",
    "ray.num_workers=2",
    "ray.use_gpu=true",
    "ray.cpus_per_worker=0.5",
    "name=multinode",
]


def test_training_on_two_nodes_survives_a_killed_worker_then_a_killed_node(
    synthetic_features: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    data = reuse_features(synthetic_features, work)
    run_dir = work / "runs" / "multinode"
    # A private Ray temp dir (short: socket paths live under it), as test_multinode.py explains.
    ray_tmp = tempfile.mkdtemp(prefix="crtm")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(HERE / "train_multinode_driver.py"),
                str(run_dir),
                str(REPO / "configs/demo.yaml"),
                *data,
                *SMALL,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, out[-4000:]
    report = json.loads(lines[-1][len("RESULT ") :])
    print(f"train multinode report ({time.monotonic() - started:.0f} s):", json.dumps(report))  # pytest -rP

    # A training worker process was killed first, then, in the restarted run, a worker node
    # hosting one of the two workers, which ran on two nodes.
    assert report.get("process_killed_on") and len(report["nodes_with_workers"]) == 2, report
    assert report["killed"] in report["nodes_with_workers"] and report["killed"] != "head", report
    assert report["registered_at_kill"] > report["registered_at_process_kill"], report
    assert report["exit_code"] == 0, out[-4000:]
    assert f"[capray] train: best checkpoint {run_dir}/best" in out, out[-4000:]

    # Ray Train restarted the workers twice, each time from a checkpoint registered at or after
    # that kill's trigger.
    resumed = [int(s) for s in re.findall(r"resuming from epoch \d+ \(step (\d+)\)", out)]
    assert len(resumed) == 2, out[-4000:]
    assert report["registered_at_process_kill"] <= resumed[0] < report["registered_at_kill"] <= resumed[1], report
    # The run ends at the step count of an uninterrupted one: its registered checkpoints (the
    # controller's record; the dying workers may leave a folder it never registered) go up one
    # report at a time, none repeated, to the last step of the last epoch.
    train_df, _ = load_split(str(work / "split.parquet"))
    total = EPOCHS * (len(train_df) // BATCH)  # the global batch: train.batch_size over all workers
    assert resumed[1] < total, "the run ended before the node was killed"
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = [r["metrics"] for r in snapshot["checkpoint_results"]]
    per_epoch = len(train_df) // BATCH
    reports = [k for k in range(1, total + 1) if k % EVERY == 0 or k % per_epoch == 0]
    assert [m["step"] for m in registered] == reports, registered
    assert registered[-1]["epoch"] == EPOCHS
