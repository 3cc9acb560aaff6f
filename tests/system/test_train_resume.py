"""Training resume: a whole `capray train` job killed right after a mid-epoch checkpoint, then re-run."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import checkpoint_states, reuse_features
from proctree import kill_job

# Two whole training jobs (killed, then resumed): minutes each on 2 cores.
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[2]
# Input streamed every epoch (train.cache_mb=0), as before the in-memory cache: from the cache an
# epoch of this small set takes about a second, so between the test seeing a registered mid-epoch
# checkpoint and its kill the workers would already have registered the next one. The cache
# itself is covered by tests/test_train.py and the learning tests.
SMALL = ["train.batch_size=16", "ray.cpus_per_worker=0.5", "train.cache_mb=0"]
# The kill lands in the second epoch (the first mid-epoch checkpoint after epoch 1); a third
# leaves the re-run whole epochs and mid-epoch checkpoints to do. More epochs only add minutes.
EPOCHS = 3


def _train_cmd(data: list[str], epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "capray.cli",
        "train",
        "configs/demo.yaml",
        *data,
        *SMALL,
        f"train.epochs={epochs}",
        "train.num_to_keep=0",
        "ray.num_workers=2",
        "name=resume",
        "train.checkpoint_every_steps=3",
    ]


def _registered_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its snapshot file). A
    checkpoint folder on disk is not enough: one not registered yet when the job dies is not
    resumed from."""
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


def test_killed_run_resumes_from_its_last_mid_epoch_checkpoint(synthetic_features: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    data = reuse_features(synthetic_features, work)
    run_dir = str(work / "runs" / "resume")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        _train_cmd(data, EPOCHS),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def mid_epoch_registered() -> bool:
        mid = {s["step"] for s in checkpoint_states(run_dir) if s["epoch_step"] and s["epoch"] >= 1}
        steps = _registered_steps(run_dir)
        return bool(steps) and steps[-1] in mid

    try:
        deadline = time.monotonic() + 600
        # Wait (bounded) until the latest registered checkpoint is a mid-epoch one after the
        # first epoch, then kill the whole job.
        while proc.poll() is None and time.monotonic() < deadline and not mid_epoch_registered():
            time.sleep(0.2)
        assert mid_epoch_registered(), "no mid-epoch checkpoint registered in time"
    finally:
        kill_job(proc)  # the whole job, Ray's Train controller and workers too
    resumed_from = _registered_steps(run_dir)[-1]
    before = set(glob.glob(f"{run_dir}/checkpoint_*"))
    killed = next(s for s in checkpoint_states(run_dir) if s["step"] == resumed_from)
    assert killed["epoch"] < EPOCHS, "the run finished before it could be killed"

    done = subprocess.run(_train_cmd(data, EPOCHS), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    said = re.findall(r"resuming from epoch \d+ \(step \d+\)", done.stdout + done.stderr)
    assert said == [f"resuming from epoch {killed['epoch']} (step {resumed_from})"], said
    states = checkpoint_states(run_dir)
    per_epoch = min(s["step"] for s in states if not s["epoch_step"])
    new = [
        json.loads(Path(d, "state.json").read_text())
        for d in sorted(set(glob.glob(f"{run_dir}/checkpoint_*")) - before)
    ]
    new.sort(key=lambda s: s["step"])
    # Every remaining step ran exactly once: checkpoints every 3 steps inside epochs and at every
    # epoch end, from the resumed step on, ending after exactly EPOCHS epochs' worth of steps.
    expected = [k for k in range(resumed_from + 1, EPOCHS * per_epoch + 1) if k % per_epoch == 0 or k % 3 == 0]
    assert [s["step"] for s in new] == expected
    assert new[-1]["epoch"] == EPOCHS and not new[-1]["epoch_step"]
    assert all(s["epoch"] == (s["step"] - 1) // per_epoch for s in new if s["epoch_step"])
    # The loss continues from where it was, it does not start over.
    assert new[0]["metrics"]["train_loss"] < states[0]["metrics"]["train_loss"]
