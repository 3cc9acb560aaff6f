"""A training worker process killed mid-epoch without retries (`train.max_failures=0`): the job fails
clearly and names its last good checkpoint. (With retries the run restarts and completes:
test_train_multinode.py kills a worker process and then a node of the same run.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import proctree
import pytest
from builders import feature_overrides, reuse_features

from capray import checkpoint

# A whole training job with a worker killed: minutes on 2 cores.
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[2]
# Input streamed every epoch (train.cache_mb=0), as before the in-memory cache: from the cache an
# epoch of this small set takes about a second, shorter than the gap between a checkpoint
# folder appearing and Ray Train's controller registering it, and a kill timed on the last
# registered checkpoint then lands inside that gap (an orphan folder of a recomputed epoch,
# docs/reliability.md). The cache itself is covered by tests/test_train.py and the learning tests.
SMALL = ["train.batch_size=16", "ray.cpus_per_worker=0.5", "train.num_to_keep=0", "train.cache_mb=0"]
EPOCHS = 4


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, synthetic_features: Path) -> Path:
    """A work dir on the session's synthetic features."""
    work = tmp_path_factory.mktemp("faults")
    reuse_features(synthetic_features, work)
    return work


def _registered(run_dir: Path) -> list[int]:
    """Epochs whose checkpoints Ray Train's controller has registered (its snapshot file). A
    checkpoint folder on disk is not enough: one the controller has not registered yet when a
    worker dies is not resumed from (Ray Train then restarts from the previous one)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["metrics"]["epoch"] for r in snapshot["checkpoint_results"])


def _train_workers(pid: int) -> list[int]:
    return proctree.titled(proctree.descendants(pid), b"ray::RayTrainWorker")


def _run_and_kill_a_worker(
    work: Path, shared: Path, name: str, max_failures: int
) -> tuple[subprocess.CompletedProcess, int]:
    """`capray train` in its own Ray instance; once epoch 1's checkpoint exists (the workers are then
    in epoch 2), SIGKILL one training worker process. Returns the finished process and the epoch
    reached when it was killed."""
    cmd = [
        sys.executable,
        "-m",
        "capray.cli",
        "train",
        str(REPO / "configs/demo.yaml"),
        *feature_overrides(shared, work),
        *SMALL,
        f"train.epochs={EPOCHS}",
        "ray.num_workers=2",
        f"train.max_failures={max_failures}",
        f"name={name}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = work / f"{name}.log"
    # A file, not a pipe: an unread pipe would fill up and block the job.
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not _registered(work / "runs" / name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        registered = _registered(work / "runs" / name)
        assert registered, f"no checkpoint registered in time: {log.read_text()[-2000:]}"
        workers = _train_workers(proc.pid)
        assert len(workers) == 2, f"expected 2 RayTrainWorker processes, found {workers}"
        killed_at = registered[-1]
        assert killed_at < EPOCHS, "training finished before a worker could be killed"
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proctree.kill_job(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), ""), killed_at


def test_without_retries_the_job_fails_clearly_and_the_last_checkpoint_loads(
    work: Path, synthetic_features: Path
) -> None:
    done, killed_at = _run_and_kill_a_worker(work, synthetic_features, "f0", max_failures=0)
    assert done.returncode != 0
    found = re.search(
        r"TrainingError: training run 'f0' failed \(.*\); the last good checkpoint is (\S+): "
        r"re-run the same command to resume from it, or set train.max_failures \(now 0\)",
        done.stdout,
    )
    assert found, done.stdout[-3000:]
    last = found.group(1)
    assert last.startswith(f"{work}/runs/f0/checkpoint_")
    model, tokenizer, _, state = checkpoint.load(last)
    assert state["epoch"] >= killed_at and state["epoch"] < EPOCHS
    assert model.vocab_size == tokenizer.vocab_size
