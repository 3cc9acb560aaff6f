"""System tests: distributed training on local Ray, checkpoints on S3 and disk, resume, scaling."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from capray import checkpoint, features, storage, synthetic, train
from capray.config import load_config, output_paths
from capray.images import decode
from capray.infer import caption
from capray.model import ImageEncoder

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.synthetic_images=96",
    "encoder.weights=random",
    "model.feature_norm=channel",
    "train.batch_size=16",
    "ray.cpus_per_worker=0.5",
]


def _states(run_dir: str) -> list[dict]:
    """Every kept checkpoint's state.json, in step order."""
    states = [json.loads(Path(p).read_text()) for p in glob.glob(f"{run_dir}/checkpoint_*/state.json")]
    return sorted(states, key=lambda s: s["step"])


def test_two_workers_checkpoint_to_s3_and_reload_decodes_identically(s3, tmp_path: Path, ray_local) -> None:
    work = f"{s3.bucket('train')}/run"
    cfg = s3.config(f"work_dir={work}", f"data.annotations={tmp_path / 'data' / 'captions.csv'}", *SMALL,
                    "train.epochs=2", "ray.num_workers=2", "name=s3run",
                    # The optional extras run under MultiWorkerMirroredStrategy too.
                    "train.attention_reg=1.0", "train.clip_norm=5.0")
    features.run(cfg)
    summary = train.train(cfg)
    p = output_paths(cfg)
    assert summary["checkpoint"] == p["best_checkpoint"]
    for name in checkpoint.REQUIRED + ("optimizer.npz",):
        assert storage.exists(f"{p['best_checkpoint']}/{name}", cfg.storage), name
    fs, runs = storage.filesystem(f"{p['runs']}/s3run", cfg.storage)
    from pyarrow.fs import FileSelector

    kept = [i.base_name for i in fs.get_file_info(FileSelector(runs)) if i.base_name.startswith("checkpoint_2")]
    assert len(kept) == 2  # train.num_to_keep default: the last 2 epochs
    saved = storage.read_bytes(f"{p['best_checkpoint']}/config.yaml", cfg.storage).decode()
    assert "secret_access_key: ''" in saved and "testing" not in saved

    # The caption job (model rebuilt from the S3 checkpoint inside a Ray actor) and a model
    # rebuilt here from the same files decode every image identically.
    heldout = tmp_path / "heldout"
    synthetic.generate(heldout, 6, seed=42, prefix="h")
    out = str(tmp_path / "captions")
    caption(cfg, summary["checkpoint"], str(heldout / "images"), out)
    import pandas as pd

    rows = pd.read_parquet(out).set_index("image")
    model, tokenizer, train_cfg, _ = checkpoint.load(summary["checkpoint"], cfg.storage)
    encoder = ImageEncoder(train_cfg.encoder.weights, train_cfg.encoder.seed)
    names = sorted(glob.glob(str(heldout / "images" / "*.jpg")))
    pixels = np.stack([decode(Path(n).read_bytes(), cfg.data.max_pixels) for n in names])
    tokens = model.greedy(encoder(pixels), tokenizer.max_length - 1)[0].numpy()
    assert [tokenizer.decode(t) for t in tokens] == [rows.loc[n, "caption"] for n in names]


def _train_cmd(work: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "capray.cli", "train", "configs/demo.yaml", f"work_dir={work}", *SMALL,
            f"train.epochs={epochs}", "train.num_to_keep=0", "ray.num_workers=2", "name=resume",
            "train.checkpoint_every_steps=3"]


def _registered_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its snapshot file). A
    checkpoint folder on disk is not enough: one not registered yet when the job dies is not
    resumed from."""
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


def test_killed_run_resumes_from_its_last_mid_epoch_checkpoint(tmp_path: Path, ray_local) -> None:
    work = tmp_path / "work"
    cfg = load_config(REPO / "configs/demo.yaml", [f"work_dir={work}", *SMALL])
    features.run(cfg)
    run_dir = str(work / "runs" / "resume")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_train_cmd(work, 6), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def mid_epoch_registered() -> bool:
        mid = {s["step"] for s in _states(run_dir) if s["epoch_step"] and s["epoch"] >= 1}
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
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed_from = _registered_steps(run_dir)[-1]
    before = set(glob.glob(f"{run_dir}/checkpoint_*"))
    killed = next(s for s in _states(run_dir) if s["step"] == resumed_from)
    assert killed["epoch"] < 6, "the run finished before it could be killed"

    done = subprocess.run(_train_cmd(work, 6), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from epoch {killed['epoch']} (step {resumed_from})" in done.stdout + done.stderr
    states = _states(run_dir)
    per_epoch = min(s["step"] for s in states if not s["epoch_step"])
    new = [json.loads(Path(d, "state.json").read_text()) for d in sorted(set(glob.glob(f"{run_dir}/checkpoint_*")) - before)]
    new.sort(key=lambda s: s["step"])
    # Every remaining step ran exactly once: checkpoints every 3 steps inside epochs and at every
    # epoch end, from the resumed step on, ending after exactly 6 epochs' worth of steps.
    expected = [k for k in range(resumed_from + 1, 6 * per_epoch + 1) if k % per_epoch == 0 or k % 3 == 0]
    assert [s["step"] for s in new] == expected
    assert new[-1]["epoch"] == 6 and not new[-1]["epoch_step"]
    assert all(s["epoch"] == (s["step"] - 1) // per_epoch for s in new if s["epoch_step"])
    # The loss continues from where it was, it does not start over.
    assert new[0]["metrics"]["train_loss"] < states[0]["metrics"]["train_loss"]


def test_one_and_two_workers_reach_the_same_validation_loss(tmp_path: Path, ray_local) -> None:
    work = tmp_path / "work"
    common = [f"work_dir={work}", *SMALL, "train.epochs=3", "train.shuffle=false"]
    features.run(load_config(REPO / "configs/demo.yaml", common))
    losses = {}
    for n in (1, 2):
        cfg = load_config(REPO / "configs/demo.yaml", [*common, f"ray.num_workers={n}", f"name=w{n}"])
        losses[n] = train.train(cfg)["metrics"]["val_loss"]
    assert losses[1] == pytest.approx(losses[2], rel=0.1), losses
