"""What a job prints, on its console and in its Ray workers' log files: capray's own lines, not
TensorFlow's start-up banners nor Ray Train's per-report INFO lines (capray.tfquiet, capray.logs),
nor warnings a user can do nothing about (tests/builders.py's TRAIN_NOISE)."""

from __future__ import annotations

from builders import BANNER_MARKS, TRAIN_NOISE


def test_real_job_logs_have_no_banner_or_train_noise_in_driver_or_workers(jobs_on_s3) -> None:
    console = jobs_on_s3.console.decode(errors="replace")
    assert "32 extracted, 0 failed" in console, console[-3000:]
    assert "best checkpoint" in console and "caption: 4 images" in console, console[-3000:]
    # Rank 0's lines reach the driver's console, once each (capray.logs: the driver tells it to
    # print); the other worker's do not.
    assert console.count("[capray] epoch 1/2 step ") == console.count("[capray] epoch 2/2 step ") == 1, console[-3000:]
    assert not [m for m in BANNER_MARKS + TRAIN_NOISE if m in console], console[-3000:]
    # Every worker's own log file too, forwarded to the driver or not (RAY_TMPDIR is root/ray;
    # not session_latest, a link).
    workers = list(jobs_on_s3.root.glob("ray/ray/session_2*/logs/worker-*"))
    assert any("[capray] epoch 1/2 step " in f.read_text(errors="replace") for f in workers), workers
    for f in workers:
        text = f.read_text(errors="replace")
        assert not [m for m in BANNER_MARKS + TRAIN_NOISE if m in text], (f, text[-2000:])
