"""The library logs, the CLI prints (capray.logs): from Python nothing is printed until the user
configures logging; the CLI's handler prints capray's records as the `[capray] ...` lines it has
always printed; Ray workers print at the level the driver tells them."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from capray import cli, logs
from capray.config import load_config
from capray.evaluate.job import log_table

REPO = Path(__file__).resolve().parents[1]
RESULT = {
    "checkpoint": "runs/x/best",
    "split": "val",
    "images": 12,
    "metrics": {"greedy": {"bleu4": 0.5, "cider": 1.25}, "beam3": {"bleu4": 0.625}},
    "notes": ["a note"],
    "report": "runs/x/best/report_val/index.html",
}
# What `capray evaluate` printed before it logged: one record now, the same lines.
TABLE = [
    "[capray] evaluate: val split, 12 images, checkpoint runs/x/best",
    "  metric          greedy     beam3",
    "  bleu4           0.5000    0.6250",
    "  cider           1.2500       nan",
    "  NOTE: a note",
    "  report: runs/x/best/report_val/index.html",
]


@pytest.fixture(autouse=True)
def capray_logger() -> Iterator[logging.Logger]:
    """The `capray` logger as the test found it, again after it (handlers, level, propagation)."""
    logger = logging.getLogger("capray")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.propagate = before[0], before[2]
    logger.setLevel(before[1])


def _scenes(tmp_path: Path) -> None:
    """A library call that logs at INFO: the synthetic dataset generated on first use."""
    from capray import synthetic

    synthetic.ensure(load_config(None, [f"work_dir={tmp_path}", "data.format=synthetic", "data.synthetic_images=2"]))


def test_the_library_prints_nothing_by_default(tmp_path: Path) -> None:
    # A fresh interpreter, without pytest's handlers: not even a warning reaches stderr.
    script = (
        "import logging, sys\nfrom capray import synthetic\nfrom capray.config import load_config\n"
        "from capray.evaluate.job import log_table\n"
        f"synthetic.ensure(load_config(None, ['work_dir={tmp_path}', 'data.format=synthetic', "
        "'data.synthetic_images=2']))\n"
        f"log_table({RESULT!r})\n"
        "logging.getLogger('capray.storage').warning('storage: a retry')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout, done.stderr) == ("", "")
    assert (tmp_path / "data" / "captions.csv").exists()


def test_the_cli_handler_prints_the_lines_unchanged_and_only_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    restore = logs.install_cli_handler()
    _scenes(tmp_path)
    log_table(RESULT)
    logging.getLogger("capray.storage").warning("storage: a retry")
    logging.getLogger("capray.storage").debug("not at INFO")
    restore()
    assert capsys.readouterr().out.splitlines() == [
        f"[capray] generating 2 synthetic scenes in {tmp_path / 'data'}",
        *TABLE,
        "[capray] storage: a retry",
    ]
    assert not caplog.records  # not propagated to the root logger's handlers too


def test_a_users_handler_receives_the_records(
    tmp_path: Path, capray_logger: logging.Logger, capsys: pytest.CaptureFixture
) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    capray_logger.addHandler(Keep())
    capray_logger.setLevel(logging.INFO)
    _scenes(tmp_path)
    log_table(RESULT)
    assert [(r.name, r.levelno) for r in records] == [
        ("capray.synthetic", logging.INFO),
        ("capray.evaluate.job", logging.INFO),
    ]
    assert records[1].getMessage().splitlines() == [line.removeprefix("[capray] ") for line in TABLE]
    assert capsys.readouterr() == ("", "")


def test_cli_main_installs_the_handler_and_leaves_logging_as_it_was(
    capray_logger: logging.Logger, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    told = []

    def parse_args(args: list[str]):
        told.append(logs.worker_level())  # what its Ray workers would be told (capray.runtime)
        return load_config(None, args)

    monkeypatch.setattr(cli, "parse_args", parse_args)
    monkeypatch.delenv("CAPRAY_DEBUG", raising=False)
    before = (list(capray_logger.handlers), capray_logger.level, capray_logger.propagate)
    assert cli.main(["train", "--print-config"]) == 0
    assert cli.main(["train", "--print-config", "--debug"]) == 0
    assert told == ["INFO", "DEBUG"]
    assert (list(capray_logger.handlers), capray_logger.level, capray_logger.propagate) == before
    capsys.readouterr()
    logging.getLogger("capray.x").warning("after main")
    assert capsys.readouterr().out == ""


def test_workers_print_at_the_level_the_driver_shows(
    capray_logger: logging.Logger, capsys: pytest.CaptureFixture
) -> None:
    # pytest's own handlers sit on the root logger: a driver whose records reach no handler is
    # one that does not propagate there.
    capray_logger.propagate = False
    assert logs.worker_level() is None
    logs.worker_logging(None)
    logging.getLogger("capray.x").warning("dropped")
    assert capsys.readouterr().out == ""

    user = logging.StreamHandler(sys.stderr)
    user.setLevel(logging.WARNING)
    capray_logger.addHandler(user)
    capray_logger.setLevel(logging.INFO)
    assert logs.worker_level() == "WARNING"  # the handler's level, above the logger's
    capray_logger.removeHandler(user)
    capray_logger.propagate = True

    # A worker told "INFO" prints like the CLI, once per line, however often it is told.
    logs.worker_logging("INFO")
    logs.worker_logging("INFO")
    logging.getLogger("capray.train.loop").info("epoch 1/1 step 3 train_loss 0.5000")
    logging.getLogger("capray.train.loop").debug("not at INFO")
    assert capsys.readouterr().out == "[capray] epoch 1/1 step 3 train_loss 0.5000\n"
