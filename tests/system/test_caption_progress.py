"""An 800-image caption job as users run it (`capray caption` in its own process, own Ray):
output files appear as it goes, a killed job keeps what it wrote, a re-run does only the rest,
and a re-run of a finished job starts no Ray Data work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from proctree import kill_job

from capray import synthetic
from capray.config import load_config
from capray.status import read_status

# A killed and a resumed caption job of 800 images on 2 cores: a minute or two each.
pytestmark = pytest.mark.timeout(1800)
REPO = Path(__file__).resolve().parents[2]
# Times count from the job's start of work, its heartbeat's `started_at` (after its Ray start-up
# and listing, before its actor starts). Sized for the first file to land well before half the
# files do: the actor's start A (TensorFlow, InceptionV3, a trace: ~10-15 s alone on 2 cores)
# plus one shard must stay under half of A plus half the shards, i.e. A < (shards / 2 - 2) x
# SHARD_ROWS / rate at ~7-13 images/s: 32 shards leave A < 27-50 s, a margin of about 2x.
N = 800
SHARD_ROWS = 25


def _cmd(checkpoint: str, root: Path, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "capray.cli",
        "caption",
        f"checkpoint={checkpoint}",
        f"caption.input={root / 'in' / 'images'}",
        f"output={root / out}",
        f"work_dir={root / 'work'}",
        f"inputs.shard_rows={SHARD_ROWS}",
        "ray.local_cpus=2",
    ]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[!_]*.parquet")) if folder.is_dir() else []  # not the index, _shards.parquet


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as f:  # a file: an unread pipe would block the job
        return subprocess.Popen(
            cmd, cwd=log.parent, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _log_shards(log: Path) -> int | None:
    """The job's shard count, from its listing line (printed before any shard is done)."""
    found = re.search(r"(\d+) images in (\d+) shards", log.read_text())
    return int(found.group(2)) if found else None


def test_progress_is_kept_as_the_job_goes_and_a_killed_job_resumes(tiny_checkpoint: str, tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "in", N, seed=4, prefix="p")

    # 1. A job killed (SIGKILL, every process of it) once half its files exist: the event a
    # kill keeps. Its first file must come long before that: a job that wrote at the end would
    # show its first file only moments before the half. (One job instead of a whole one and a
    # killed one: the first file's time against the half's does not need a job run to its end.)
    log = tmp_path / "killed.log"
    killed = _start(_cmd(tiny_checkpoint, tmp_path, "out"), log)
    first = half = None  # time.time() when seen
    shards = None
    storage_cfg = load_config(None, []).storage
    running = None
    while killed.poll() is None:
        shards = shards or _log_shards(log)
        files = len(_files(tmp_path / "out"))
        if first is None and files:
            first = time.time()
            # `capray status` of the running job, from the folder alone (its heartbeat is written
            # before the first shard is given out).
            running = read_status(str(tmp_path / "out"), storage_cfg)
        if shards and files >= shards / 2:
            half = time.time()
            break
        time.sleep(0.2)  # polling the output folder: its files are the event
    kill_job(killed)
    assert half is not None, f"the job ended before half its files were written: {log.read_text()[-3000:]}"
    assert shards >= N // (2 * SHARD_ROWS)  # about SHARD_ROWS each
    assert first is not None and running is not None, log.read_text()[-3000:]
    # From the job's start of work (its heartbeat, written before the first shard is given out).
    started = running["job"]["started_at"]
    first, half = first - started, half - started
    assert 0 < first < half / 2, f"first file {first:.0f} s after the job started, half of {shards} after {half:.0f} s"
    kept_files = _files(tmp_path / "out")  # complete files only: each is written whole, then renamed
    kept, kept_rows = len(kept_files), sum(pq.ParquetFile(f).metadata.num_rows for f in kept_files)
    assert 0 < kept < shards, f"{kept} files when killed"
    print(f"\nfirst of {shards} files after {first:.1f} s, half after {half:.1f} s: killed with {kept} files")
    assert running["job"]["state"] == "running" and running["job"]["alive"]
    assert running["shards"]["total"] == shards and running["shards"]["done"] >= 1
    # The killed job seen an hour later: no heartbeat since, so not alive and no ETA; its done
    # shards counted from the listing, their rows from the stats (roll-up or footers).
    dead = read_status(str(tmp_path / "out"), storage_cfg, now=time.time() + 3600)
    assert dead["job"]["state"] == "lost" and not dead["job"]["alive"] and dead["eta_s"] is None
    assert dead["shards"]["done"] == kept and dead["shards"]["total"] == shards
    assert dead["shards"]["stats_unknown"] == 0 and dead["rows"]["done"] == kept_rows

    # 2. The re-run does only the rest.
    resumed = subprocess.run(
        _cmd(tiny_checkpoint, tmp_path, "out"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == N and rows["image"].is_unique and rows["error"].isna().all()
    assert len(_files(tmp_path / "out")) == shards
    found = re.search(r"(\d+) already done \((\d+) images\), (\d+) written \((\d+) rows", resumed.stdout)
    assert found, resumed.stdout[-1000:]
    done_before, done_images, written = int(found.group(1)), int(found.group(2)), int(found.group(4))
    # None of the kept files' images again. (Not a fixed share of N: the kill comes at half the
    # files, and shards hold about, not exactly, SHARD_ROWS images each.)
    assert (done_before, done_images, written) == (kept, kept_rows, N - kept_rows)
    print(f"the re-run found {done_before} files done and captioned {written} of {N} images")
    done = read_status(str(tmp_path / "out"), storage_cfg)
    assert done["job"]["state"] == "finished" and done["shards"]["done"] == done["shards"]["total"] == shards
    assert (
        done["rows"]["done"] == done["rows"]["ok"] == N
        and done["eta_s"] == 0.0
        and done["throughput"]["run_rows_per_s"]
    )

    # 3. A re-run of the finished job lists the output folder and stops: no Ray Data execution at all.
    again = subprocess.run(
        _cmd(tiny_checkpoint, tmp_path, "out"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert "Starting execution of Dataset" not in again.stdout + again.stderr
