"""The `capray` command as users meet it: one line and a documented exit code per kind of expected
failure (docs/cli.md), checks in the driver before Ray starts, and no TensorFlow start-up banners
(whole jobs' logs: tests/system/test_job_logs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import BANNER_MARKS

from capray import cli, tfquiet

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
BANNERS = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795695661.373005   10093 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "I0000 00:00:1795695661.368412   10093 port.cc:153] oneDNN custom operations are on. You may see slightly different "
    "numerical results due to floating-point round-off errors from different computation orders. To turn them off, "
    "set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "E0000 00:00:1795695665.986535   10093 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call "
    "to cuInit: UNKNOWN ERROR (303)",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CAPRAY_DEBUG")}
    return {**env, **extra}


def _capray(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "capray", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_failure(done: subprocess.CompletedProcess, job: str, code: int, message: str) -> None:
    """Exit `code`, and stderr is the single `capray <job>: ...` line holding `message`."""
    assert done.returncode == code, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"capray {job}: ") and message in lines[0], done.stderr[-2000:]
    # Checked in the driver before Ray starts: no Ray instance was started for it.
    assert "Ray" not in done.stdout + done.stderr


# --- exit codes ----------------------------------------------------------------------------------


def test_exit_codes_follow_the_class_hierarchy_by_name() -> None:
    from capray.backbone import BackboneError
    from capray.captioning import CaptionJobError
    from capray.checkpoint import CheckpointError
    from capray.config import ConfigError
    from capray.data import DataError
    from capray.featurestore import FeatureError
    from capray.inputs import InputError
    from capray.pipeline import JobError

    class TrainingError(RuntimeError):  # capray.train's, matched by name (importing it loads TensorFlow)
        pass

    expected = {
        ConfigError: 2,
        InputError: 3,
        DataError: 3,
        CheckpointError: 4,
        FeatureError: 5,
        BackboneError: 6,
        JobError: 7,
        CaptionJobError: 7,
        TrainingError: 8,
    }
    for cls, code in expected.items():
        assert cli.exit_code(cls("x")) == code, cls
    assert cli.exit_code(ValueError("a bug")) is None and cli.exit_code(KeyError("a bug")) is None


@pytest.mark.parametrize("error, code", [("CaptionJobError", 7), ("TrainingError", 8)])
def test_a_job_stopped_part_way_is_one_line_with_its_code(
    error: str, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Neither can be caused in a second (a storage outage mid-job, workers lost for good): the job
    # itself is replaced, the CLI around it is the real one.
    from capray.pipeline import JobError

    # CaptionJobError is known by its base class, TrainingError by its own name.
    kind = type(error, (JobError if error == "CaptionJobError" else RuntimeError,), {})
    monkeypatch.setattr("capray.runner.preflight", lambda job, cfg: None)
    monkeypatch.setattr("capray.runtime.init_ray", lambda cfg: None)

    def stopped(job: str, cfg: object) -> None:
        raise kind("stopped before every shard was written; re-run to continue")

    monkeypatch.setattr("capray.runner.run_job", stopped)
    assert cli.main([DEMO], job="caption") == code
    err = capsys.readouterr().err
    assert err == f"capray caption: {error}: stopped before every shard was written; re-run to continue\n"


def test_an_unexpected_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("capray.runner.preflight", lambda job, cfg: {}["bug"])
    with pytest.raises(KeyError):
        cli.main([DEMO], job="caption")


def test_missing_input_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ("caption", DEMO, f"work_dir={tmp_path}", "caption.input=nonexistent_dir")
    missing = REPO / "nonexistent_dir"
    _one_line_failure(_capray(*args), "caption", 3, f"InputError: input not found: {missing}")
    for debug in (_capray(*args, "--debug"), _capray(*args, env=_env(CAPRAY_DEBUG="1"))):
        assert debug.returncode == 3
        assert "Traceback" in debug.stderr and debug.stderr.rstrip().endswith(f"input not found: {missing}")


def test_an_input_that_is_one_file_of_no_input_kind_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "list.tsv").write_text("image\ta.jpg\n")
    done = _capray("extract", DEMO, f"work_dir={tmp_path}", f"extract.input={tmp_path / 'list.tsv'}")
    _one_line_failure(done, "extract", 3, f"InputError: {tmp_path / 'list.tsv'} is a file of no input kind")


def test_missing_checkpoint(tmp_path: Path) -> None:
    done = _capray(
        "caption", DEMO, f"work_dir={tmp_path}", f"caption.input={tmp_path}", f"checkpoint={tmp_path / 'ckpt'}"
    )
    _one_line_failure(done, "caption", 4, f"CheckpointError: checkpoint not found: {tmp_path / 'ckpt'}")


def test_missing_features(tmp_path: Path) -> None:
    done = _capray("train", DEMO, f"work_dir={tmp_path}")
    _one_line_failure(done, "train", 5, f"FeatureError: no features at {tmp_path / 'features'}: run `capray extract`")


def test_missing_captions_file(tmp_path: Path) -> None:
    done = _capray(
        "extract", DEMO, f"work_dir={tmp_path}", "data.format=flickr", f"data.annotations={tmp_path / 'c.csv'}"
    )
    _one_line_failure(done, "extract", 3, f"DataError: data.annotations: file not found: {tmp_path / 'c.csv'}")


def test_bad_backbone_weights_path(tmp_path: Path) -> None:
    done = _capray("extract", DEMO, f"work_dir={tmp_path}", f"backbone.weights={tmp_path / 'w.h5'}")
    _one_line_failure(done, "extract", 6, f"BackboneError: backbone.weights: file not found: {tmp_path / 'w.h5'}")


def test_imagenet_weights_offline_fail_in_the_driver_in_one_line(tmp_path: Path) -> None:
    # An empty Keras cache and a proxy that refuses connections: offline on every machine.
    refused = "http://127.0.0.1:9"
    env = {k: v for k, v in _env().items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(KERAS_HOME=str(tmp_path / "keras"), https_proxy=refused, HTTPS_PROXY=refused)
    done = _capray("extract", DEMO, f"work_dir={tmp_path / 'work'}", "backbone.weights=imagenet", env=env)
    _one_line_failure(done, "extract", 6, "BackboneError: could not load the ImageNet InceptionV3 weights")
    assert (
        "give a local or object-storage (s3://, gs://, az://) copy of the no-top weights file with backbone.weights="
        in done.stderr
    )


def test_bad_config(tmp_path: Path) -> None:
    _one_line_failure(_capray("train", DEMO, "train.epochz=3"), "train", 2, "Key 'epochz' not in 'TrainConfig'")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--overwrite"], "--overwrite applies to extract, caption and export, not train"),
        (["evaluate", "--limit", "2"], "--limit applies to extract and caption, not evaluate"),
    ],
)
def test_a_flag_for_other_jobs_is_refused_not_ignored(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path: Path) -> None:
    # Under a file, not a read-only folder: root may write into any folder.
    (tmp_path / "file").write_text("")
    done = _capray(
        "caption", DEMO, f"work_dir={tmp_path}", f"caption.input={tmp_path}", f"output={tmp_path / 'file' / 'caps'}"
    )
    _one_line_failure(done, "caption", 3, f"InputError: cannot write the output folder {tmp_path / 'file' / 'caps'}")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file_is_refused_for_the_output_and_the_work_dir(tmp_path: Path) -> None:
    # /proc passes os.access for root, as a read-only mount does: only a file made there tells.
    done = _capray("extract", DEMO, "work_dir=/proc/capray-test", f"extract.input={tmp_path}")
    _one_line_failure(
        done, "extract", 3, "cannot write the output folder /proc/capray-test/features: /proc takes no new file"
    )
    (tmp_path / "file").write_text("")
    done = _capray(
        "caption",
        DEMO,
        f"work_dir={tmp_path / 'file' / 'w'}",
        f"caption.input={tmp_path}",
        f"output={tmp_path / 'caps'}",
    )
    _one_line_failure(
        done, "caption", 3, f"InputError: cannot write the work_dir (input listings) {tmp_path / 'file' / 'w'}"
    )


def test_overwrite_never_deletes_the_input_or_a_folder_that_is_no_output(tmp_path: Path) -> None:
    # `--overwrite` deletes the output folder first: given the photos' folder as output, it
    # deleted the photos.
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    done = _capray(
        "caption", DEMO, f"work_dir={tmp_path / 'w'}", f"caption.input={photos}", f"output={photos}", "--overwrite"
    )
    _one_line_failure(
        done, "caption", 3, f"caption.overwrite=true would delete {photos}, which is or holds the caption.input"
    )
    done = _capray("export", DEMO, f"work_dir={tmp_path / 'w'}", f"output={photos}", "--overwrite")
    _one_line_failure(done, "export", 9, f"{photos} exists and is no SavedModel (no saved_model.pb)")
    assert [p.name for p in photos.iterdir()] == ["a.jpg"]


def test_print_config_and_module_entry() -> None:
    done = _capray("train", DEMO, "train.epochs=3", "--print-config")
    assert done.returncode == 0 and "epochs: 3" in done.stdout, done.stderr[-2000:]


def test_flags_may_stand_before_between_or_after_the_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (
        ["caption", "--print-config", DEMO, "train.epochs=3", "--limit", "2"],
        ["caption", DEMO, "--limit", "2", "train.epochs=3", "--print-config"],
    ):
        assert cli.main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "epochs: 3" in out and "limit_shards: 2" in out, argv
    # `capray status OUTPUT --json key=value`: the override after the flag is not refused.
    assert cli.main(["status", str(tmp_path / "none"), "--json", "storage.retries=1"]) == 3
    assert "output folder not found" in capsys.readouterr().err


def test_status_and_overview_take_the_output_folder_first_or_as_the_jobs_output_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # `output=FOLDER`, as the caption and extract jobs take it, is the folder.
    assert cli.main(["status", f"output={tmp_path / 'none'}"]) == 3
    assert f"output folder not found: {tmp_path / 'none'}\n" in capsys.readouterr().err
    # Nothing, an override or a config file where the folder goes: named, with the usage.
    for command in ("status", "overview"):
        for argv, named in (
            ([], ""),
            (["storage.retries=1"], "'storage.retries=1' is an override: "),
            ([DEMO, "storage.retries=1"], f"'{DEMO}' is a config file: "),
        ):
            with pytest.raises(SystemExit) as exited:
                cli.main([command, *argv])
            err = capsys.readouterr().err
            assert exited.value.code == 2, err
            assert f"{named}give the job's output folder first: capray {command} OUTPUT [config.yaml ...]" in err


# --- TensorFlow's start-up banners ---------------------------------------------------------------


def test_the_filter_drops_the_banners_and_keeps_every_other_line() -> None:
    real = [
        "W0000 00:00:1795695665.1 10093 some_op.cc:12] a real warning",
        "E0000 00:00:1.2 7 x.cc:1] real error",
        "Traceback (most recent call last):",
        "UserWarning: something Python said",
        "",
    ]
    assert [line for line in BANNERS + real if not tfquiet.is_noise(line)] == real
    text = "\n".join(BANNERS[:2] + real[:2] + BANNERS[2:]) + "\n"
    assert tfquiet.without_noise(text) == real[0] + "\n" + real[1] + "\n"


def test_filtered_stderr_replays_what_is_not_a_banner(capfd: pytest.CaptureFixture) -> None:
    with tfquiet.filtered_stderr():
        os.write(2, ("\n".join(BANNERS[:2]) + "\nreal error from C++\n").encode())
        print("a Python warning", file=sys.stderr)
    # Python's lines reach pytest's capture without fd 2: only the set of lines is compared.
    assert sorted(capfd.readouterr().err.splitlines()) == ["a Python warning", "real error from C++"]


def test_importing_the_model_and_running_an_op_prints_no_banner() -> None:
    # Also `import tensorflow` directly and through Ray Train (as its workers do), once capray is in.
    script = (
        "import capray.model as m, tensorflow, ray.train.tensorflow, sys\n"
        "print(float(m.tf.reduce_sum(m.tf.ones((2, 2)))))\nprint('after', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "4.0", done.stderr[-3000:]
    assert not [m for m in BANNER_MARKS if m in done.stderr], done.stderr[-3000:]
    assert "after" in done.stderr
