"""`capray status` (capray/status.py) on stand-in output folders, local and on the S3 server: a
running job (fresh heartbeat), a killed one (stale heartbeat), a finished one; the roll-up and the
footers read together; the `--json` schema. Real jobs' status: tests/test_caption.py and
tests/system/test_caption_progress.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from builders import standin_output

from capray import cli
from capray.status import FORMAT, read_status

# docs/cli.md#status documents every key of this schema.
SCHEMA = {
    "format": str,
    "output": str,
    "input": str,
    "checked_at": float,
    "job": dict,
    "shards": {"total", "done", "todo", "stats_rolled_up", "stats_from_footers", "stats_unknown"},
    "rows": {"total", "done", "ok", "failed", "copied"},
    "errors": dict,
    "bytes_read": int,
    "seconds": {"read", "decode", "wait", "model", "write", "upload"},
    "throughput": {"window_s", "recent_rows_per_s", "run_rows_per_s"},
    "eta_s": (float, type(None)),
    "settings": dict,
}
JOB_KEYS = {"state", "alive", "job", "run", "host", "pid", "started_at", "heartbeat_at", "heartbeat_age_s"}


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path):
    """(output folder, storage config) on local disk or on the S3 server."""
    if request.param == "local":
        from capray.config import load_config

        return str(tmp_path / "captions"), load_config(None, []).storage
    s3 = request.getfixturevalue("s3")
    return f"{s3.bucket(f'status-{tmp_path.name.lower()[-20:]}')}/captions", s3.config().storage


@pytest.mark.parametrize("max_footers", [1000, 5], ids=["looked-up", "listed"])
def test_a_running_job_counts_rolled_up_and_newer_shards_and_has_an_eta(place, max_footers: int) -> None:
    out, storage_cfg = place
    last_end = standin_output(out, storage_cfg, shards=20, done=12, rolled_up=8)
    # The 12 shards not rolled up are looked up one by one, or (more than max_footers) found by a
    # listing. Seen a second after the last shard ended, however long the folder took to write.
    s = read_status(out, storage_cfg, max_footers=max_footers, now=last_end + 1)
    assert s["format"] == FORMAT and s["input"] == "s3://in/photos"
    assert s["shards"] == {
        "total": 20, "done": 12, "todo": 8, "stats_rolled_up": 8, "stats_from_footers": 4, "stats_unknown": 0,
    }  # fmt: skip
    assert s["rows"] == {"total": 2000, "done": 1200, "ok": 1188, "failed": 12, "copied": 0}
    assert s["errors"] == {"truncated": 12} and s["bytes_read"] == 12 * 100_000
    assert s["job"]["state"] == "running" and s["job"]["alive"]
    # 12 shards of 100 rows ended one a second: ~100 rows/s; 800 rows left: ~8 s.
    assert 50 < s["throughput"]["recent_rows_per_s"] <= 100 and s["eta_s"] is not None and 8 <= s["eta_s"] <= 16


def test_a_killed_job_is_not_alive_and_has_no_eta(place) -> None:
    out, storage_cfg = place
    standin_output(out, storage_cfg, shards=20, done=5, rolled_up=0, heartbeat_at=time.time() - 600)
    s = read_status(out, storage_cfg)
    assert s["job"]["state"] == "lost" and not s["job"]["alive"] and s["eta_s"] is None
    assert s["shards"]["done"] == 5 and s["shards"]["stats_from_footers"] == 5 and s["rows"]["failed"] == 5
    # Its throughput is that of its last minutes before it stopped, not a rate decaying with time.
    assert s["throughput"]["recent_rows_per_s"] > 50


def test_a_finished_job_and_the_json_schema_of_the_command(place, capsys: pytest.CaptureFixture) -> None:
    out, storage_cfg = place
    standin_output(out, storage_cfg, shards=6, done=6, rolled_up=6, state="finished")
    settings = [
        f"storage.{k}={v}"
        for k, v in storage_cfg.items()
        if v not in ("", None) and k.endswith(("url", "region", "id", "key"))
    ]
    assert cli.main(["status", out, *settings, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key, kind in SCHEMA.items():
        assert key in s, key
        if isinstance(kind, set):
            assert set(s[key]) == kind, key
        else:
            assert isinstance(s[key], kind), (key, s[key])
    assert set(s["job"]) == JOB_KEYS and set(s) == set(SCHEMA)
    assert s["job"]["state"] == "finished" and s["eta_s"] == 0.0 and s["shards"]["todo"] == 0
    assert cli.main(["status", out, *settings]) == 0
    text = capsys.readouterr().out
    assert "shards    6 of 6 done (100.0%), 0 to do" in text and "truncated 6" in text and "eta       done" in text


def test_a_folder_that_is_no_job_output_is_one_line_with_exit_code_3(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "x").mkdir()
    assert cli.main(["status", str(tmp_path / "x")]) == 3
    assert "no _shards.parquet" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path / "nothing")]) == 3
    assert "output folder not found" in capsys.readouterr().err
    # A work_dir, or a training run's folder, given in place of a job's output: what it is instead.
    for name in ("captions", "features"):
        (tmp_path / "work" / name).mkdir(parents=True)
        (tmp_path / "work" / name / "_shards.parquet").write_bytes(b"")
    (tmp_path / "work" / "runs" / "r" / "tensorboard").mkdir(parents=True)
    assert cli.main(["status", str(tmp_path / "work")]) == 3
    work = tmp_path / "work"
    assert capsys.readouterr().err.endswith(
        f"; the job output folders below it: {work / 'captions'}, {work / 'features'}\n"
    )
    assert cli.main(["status", str(work / "runs" / "r")]) == 3
    assert capsys.readouterr().err.endswith(
        f"; it is a training run's folder: its best checkpoint is in best.json, its curves in TensorBoard "
        f"(tensorboard --logdir {work / 'runs' / 'r' / 'tensorboard'})\n"
    )
