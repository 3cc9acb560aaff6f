"""Every job as users run it, on a real Ray: the whole pipeline (extract, train, evaluate, caption,
export) through `capray.cli` with relative paths on the session's local Ray, its training and
evaluation through the jobs/ entry points submitted with `ray job submit --working-dir .` to a
Ray head started with `ray start --head` (Job Submission API); the extract entry point submitted
with GPU-sharing actors; and plain `python jobs/<job>.py`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from capray import cli, evaluate, synthetic
from capray.config import load_config, output_paths
from capray.text import clean

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A real extraction, kept small: 24 synthetic scenes through the random InceptionV3.
EXTRACT = ["configs/demo.yaml", "data.synthetic_images=24", "extract.batch_size=8"]
# The pipeline, small but complete: 64 scenes, 2 epochs, 1 training worker (2 workers are
# test_train.py's).
OVERRIDES = [
    "data.synthetic_images=64",
    "data.synthetic_heldout=12",
    "train.epochs=2",
    "train.batch_size=16",
    "ray.num_workers=1",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    """This virtualenv first on PATH (the job's `python`), and no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict]:
    """Its own Ray head (`ray start --head --block`, own temp dir and ports), stopped afterwards.

    It declares one GPU, which this machine does not have: Ray schedules by declared resources,
    so actors asking for half a GPU are placed two to it, as on a GPU node, and TensorFlow in
    them finds no CUDA device and runs on the CPU.

    Never `ray stop`: that would stop every Ray instance on the machine. The head runs in its own
    process group, which the finalizer terminates.
    """
    # Short path: Ray's unix sockets live under it and are limited to 107 bytes.
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    gcs, dashboard, nm, om, client, agent, agent_grpc, metrics, env_agent = _free_ports(9)
    log = open(Path(temp) / "ray_start.log", "w")  # noqa: SIM115 (the head keeps writing to it after this returns)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=3",
            "--num-gpus=1",
            f"--temp-dir={temp}",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}",
        ],
        # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists (any earlier local
        # ray.init writes one); this head is on 127.0.0.1 for one test module, so it is off.
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**_env(), "RAY_AUTH_MODE": "disabled"},
        start_new_session=True,
    )
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"ray start exited: {(Path(temp) / 'ray_start.log').read_text()[-2000:]}"
            try:
                client = JobSubmissionClient(address)
                # Ready when a job runs: the job list answers before the node's job agent is up, and
                # a job submitted then fails with "No available agent to submit job".
                ready = client.submit_job(entrypoint="true")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)  # polling interval while the dashboard starts (not synchronisation)
        assert _wait(client, ready, timeout=120) == JobStatus.SUCCEEDED, client.get_job_logs(ready)
        yield {"client": client, "temp": temp}
    finally:
        # A throw-away head: no graceful shutdown is needed (`ray start --block` spends ~30 s on
        # one), so a short grace, then SIGKILL for its process group and anything left that runs
        # from its temp dir.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_processes_using(temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_using(path: str) -> None:
    """SIGKILL every process whose command line names `path` (the head's Ray processes)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if path.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # exited while we looked


def _wait(client, job_id: str, timeout: float = 420) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(1)
    return status


@pytest.fixture(scope="module")
def extract_job(ray_head: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The extract job submitted once: its status, logs and work dir (the training test trains on
    its features, so the module pays for one extraction)."""
    client = ray_head["client"]
    work = tmp_path_factory.mktemp("submitted") / "work"
    # Two InceptionV3 actors sharing the head's one GPU (fractional num_gpus): the pool cannot
    # start both unless half a GPU each is honoured, and the job would then never finish.
    gpu = ["extract.num_gpus=0.5", "extract.min_actors=2", "extract.max_actors=2", "inputs.shard_rows=6"]
    entrypoint = " ".join(["python", "jobs/extract.py", *EXTRACT, *gpu, f"work_dir={work}"])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    status = _wait(client, job_id)
    return {"status": status, "logs": client.get_job_logs(job_id), "work": work}


@pytest.mark.timeout(600)  # a head, a working-dir upload and a whole job
def test_extract_job_submitted_with_working_dir_succeeds(ray_head: dict, extract_job: dict) -> None:
    from ray.job_submission import JobStatus

    logs, work = extract_job["logs"], extract_job["work"]
    assert extract_job["status"] == JobStatus.SUCCEEDED, logs[-3000:]
    assert "24 extracted, 0 failed" in logs
    # The driver's and the actors' lines (Ray forwards them): TensorFlow started in both, quietly.
    for banner in ("Could not find cuda drivers", "failed call to cuInit", "oneDNN custom operations are on"):
        assert banner not in logs, logs[-3000:]

    table = pq.read_table(work / "features")
    assert table.num_rows == 24 and len(set(table["image"].to_pylist())) == 24
    assert len(table["features"][0].as_py()) == 64 * 2048 * 2  # float16 (64, 2048)

    # The code that ran is the uploaded copy of the repository, without what .gitignore excludes.
    code = Path(re.search(r"\[capray\] extract: capray [\w.]+ from (\S+)", logs).group(1))
    uploaded = code.parent
    assert str(uploaded).startswith(ray_head["temp"]) and "working_dir_files" in str(uploaded)
    assert (uploaded / "jobs" / "extract.py").is_file() and (uploaded / "configs" / "demo.yaml").is_file()
    for ignored in (".venv", "outputs", "dist"):
        assert not (uploaded / ignored).exists(), f"{ignored}/ was uploaded with the working dir"


def _submitted(client, script: str, args: list[str]) -> str:
    """`python jobs/<script> <args>` submitted with the repository as its working dir: its logs, once it succeeded."""
    from ray.job_submission import JobStatus

    entrypoint = f"python jobs/{script} {shlex.join(args)}"
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    status, logs = _wait(client, job_id), client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"jobs/{script}: {logs[-3000:]}"
    return logs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, ray_local, ray_head: dict) -> dict:
    """The pipeline, once: extract, caption and export in this process with paths relative to the
    working directory, as users type them (`make demo` uses outputs/demo: Ray workers run in other
    directories and must still find every output); train (evaluating its best checkpoint at the
    end) and evaluate submitted to the Ray head as jobs/train.py and jobs/evaluate.py. Relative
    paths are made absolute where any job loads its config (capray.config), so the submitted
    jobs get the same folder by its absolute path."""
    work = tmp_path_factory.mktemp("pipeline")
    client = ray_head["client"]
    old = os.getcwd()
    os.chdir(work)
    try:
        args = [str(REPO / "configs/demo.yaml"), "work_dir=out", *OVERRIDES]
        assert cli.main(args, job="extract") == 0
        submitted = ["configs/demo.yaml", f"work_dir={work / 'out'}", *OVERRIDES]
        # The training job evaluates its best checkpoint at the end when asked (greedy only here).
        evaluate_at_end = ["evaluate.after_train=true", "evaluate.strategies=[greedy]", "evaluate.report_images=0"]
        logs = {"train": _submitted(client, "train.py", [*submitted, *evaluate_at_end])}
        best = json.loads(Path("out/runs/demo/best.json").read_text())["checkpoint"]
        after_train = json.loads((Path(best) / "eval_val.json").read_text())
        logs["evaluate"] = _submitted(client, "evaluate.py", [*submitted, "evaluate.report_images=2"])
        synthetic.generate("heldout", 12, seed=99, prefix="heldout")
        Path("heldout/images/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        # The caption job writes its overview page at the end when asked (runner.run_job).
        caption = [*args, "caption.input=heldout/images", "overview.after_job=true", "overview.gallery=3"]
        assert cli.main(caption, job="caption") == 0
        assert cli.main([*args, "output=exported"], job="export") == 0
        refused = cli.main([*args, "output=exported"], job="export")  # exists, and no --overwrite
    finally:
        os.chdir(old)
    cfg = load_config(REPO / "configs/demo.yaml", [f"work_dir={work / 'out'}", *OVERRIDES])
    return {"work": work, "cfg": cfg, "after_train": after_train, "export_refused": refused, "logs": logs}


@pytest.mark.timeout(900)  # the whole pipeline (the `run` fixture), two of its jobs submitted
def test_train_and_evaluate_submitted_with_working_dir_and_the_checkpoint_loads(run: dict) -> None:
    import capray

    work = run["work"] / "out"
    best = work / "runs" / "demo" / "best"
    assert f"[capray] train: best checkpoint {best}" in run["logs"]["train"], run["logs"]["train"][-3000:]
    result = json.loads((best / "eval_val.json").read_text())
    assert result["checkpoint"] == str(best) and result["images"] > 0
    assert f"evaluate: val split, {result['images']} images, checkpoint {best}" in run["logs"]["evaluate"]

    # The submitted job's checkpoint in the Python API, in this process.
    captioner = capray.Captioner(str(best))
    assert captioner.tokenizer.to_json() == (work / "tokenizer.json").read_text()
    images = sorted((work / "data" / "images").glob("*.jpg"))[:2]
    captions = captioner.caption([str(p) for p in images])
    assert len(captions) == 2
    for cap in captions:
        assert cap.num_tokens >= 1 and np.isfinite(cap.log_prob) and cap.log_prob < 0, cap
        assert all(w in captioner.tokenizer.index for w in cap.words), cap


def test_a_failing_job_is_reported_failed_with_the_config_error(ray_head: dict) -> None:
    from ray.job_submission import JobStatus

    client = ray_head["client"]
    job_id = client.submit_job(
        entrypoint="python jobs/train.py configs/demo.yaml train.epochz=3", runtime_env={"working_dir": str(REPO)}
    )
    assert _wait(client, job_id, timeout=120) == JobStatus.FAILED
    assert "Key 'epochz' not in 'TrainConfig'" in client.get_job_logs(job_id)


@pytest.mark.timeout(600)  # a whole job in a fresh Ray instance
def test_local_entry_point_runs_the_code_next_to_it(tmp_path: Path) -> None:
    # A copy of the entry points and library elsewhere: `python jobs/extract.py` must import the
    # capray beside it (not the installed one) and run a real job on a local Ray instance.
    copy = tmp_path / "checkout"
    for part in ("capray", "jobs", "configs"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            "jobs/extract.py",
            "configs/demo.yaml",
            "data.synthetic_images=8",
            "extract.batch_size=8",
            "ray.local_cpus=2",
            f"work_dir={work}",
        ],
        cwd=copy,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"capray 0.1.0 from {copy / 'capray'}" in result.stdout
    assert pq.read_table(work / "features").num_rows == 8


def test_extract_writes_one_row_per_image_and_config(run: dict) -> None:
    p = output_paths(run["cfg"])
    table = pq.read_table(p["features"])
    split = pd.read_parquet(p["split"])
    assert sorted(table["image"].to_pylist()) == sorted(split["image"].unique())
    assert set(table["dtype"].to_pylist()) == {"float16"}
    assert len(table["features"][0].as_py()) == 64 * 2048 * 2
    saved = (Path(p["features"]) / "_capray_config.yaml").read_text()
    assert "weights: random" in saved


def test_train_writes_checkpoints_and_best(run: dict) -> None:
    best = json.loads(Path(output_paths(run["cfg"])["best"]).read_text())
    ckpt = Path(best["checkpoint"])
    for name in ("model.weights.h5", "optimizer.npz", "tokenizer.json", "config.yaml", "state.json"):
        assert (ckpt / name).is_file(), name
    # best.json is the epoch with the lowest validation loss, and its copy is that checkpoint.
    run_dir = Path(output_paths(run["cfg"])["runs"]) / "demo"
    epochs = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/state.json")]
    assert sorted(s["epoch"] for s in epochs) == [1, 2]
    lowest = min(epochs, key=lambda s: s["metrics"]["val_loss"])
    assert best["metrics"] == lowest["metrics"]
    assert json.loads((ckpt / "state.json").read_text())["metrics"] == lowest["metrics"]


def test_caption_writes_one_row_per_image_with_errors(run: dict) -> None:
    rows = pd.read_parquet(output_paths(run["cfg"])["captions"])
    assert len(rows) == 13 and rows["image"].is_unique
    assert list(rows.columns) == [
        "image",
        "caption",
        "log_prob",
        "num_tokens",
        "strategy",
        "model",
        "error",
        "image_version",
    ]
    broken = rows[rows["image"].str.endswith("broken.jpg")].iloc[0]
    assert "cannot decode" in broken["error"] and pd.isna(broken["caption"])
    good = rows[rows["error"].isna()]
    assert len(good) == 12 and (good["num_tokens"] >= 1).all()
    assert (good["strategy"] == "greedy").all()
    page = (Path(output_paths(run["cfg"])["captions"]) / "_status" / "overview.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 6 and "broken.jpg" in page


def test_evaluate_scores_the_validation_split(run: dict) -> None:
    best = json.loads(Path(output_paths(run["cfg"])["best"]).read_text())
    result = json.loads((Path(best["checkpoint"]) / "eval_val.json").read_text())
    val_images = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")["image"].nunique()
    assert result["images"] == val_images and result["split"] == "val"
    assert list(result["metrics"]) == ["greedy", "beam3"]
    # The scores are those of the best checkpoint's own greedy captions of the validation images,
    # decoded here without the job: the right checkpoint, split, features and references.
    predictions = _greedy_captions(best["checkpoint"], run["cfg"])
    split = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")
    references = split.groupby("image")["caption"].apply(list).to_dict()
    assert sorted(predictions) == sorted(references)
    exact = sum(" ".join(clean(predictions[i])) in {" ".join(clean(r)) for r in references[i]} for i in references)
    greedy = result["metrics"]["greedy"]
    assert greedy["exact_match"] == exact / len(references)
    expected = evaluate.score(predictions, references)
    for name in ("bleu1", "bleu4", "rouge_l", "cider", "meteor"):
        assert greedy.get(name) == expected.get(name), name
    assert ("meteor" in greedy) == (not any("METEOR skipped" in n for n in result["notes"]))
    # Evaluating at the end of training scored the same checkpoint the same way.
    assert run["after_train"]["metrics"]["greedy"] == greedy
    assert any("backbone.weights=random" in n for n in result["notes"])
    report = Path(result["report"])
    assert report == Path(best["checkpoint"]) / "report_val" / "index.html"
    assert sorted(p.name for p in report.parent.glob("*.png")) == ["000_attention.png", "001_attention.png"]
    page = report.read_text(encoding="utf-8")
    # Two attention figures and the loss curves (the checkpoint has loss.png).
    assert page.count("data:image/png;base64,") == 3 and page.count("data:image/jpeg;base64,") == 2


def test_train_can_evaluate_at_the_end(run: dict) -> None:
    assert list(run["after_train"]["metrics"]) == ["greedy"]
    val_images = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")["image"].nunique()
    assert run["after_train"]["images"] == val_images and "report" not in run["after_train"]


def test_training_writes_tensorboard_curves_and_a_loss_plot(run: dict) -> None:
    import tensorflow as tf

    from capray.train.curves import TAGS

    p = output_paths(run["cfg"])
    reported = sorted(
        json.loads(f.read_text())["step"] for f in (Path(p["runs"]) / "demo").glob("checkpoint_*/state.json")
    )
    assert len(reported) == 2  # two epochs, one report each
    values: dict[str, list[int]] = {}
    for f in Path(p["tensorboard"]).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(event.step)
    assert {tag: sorted(steps) for tag, steps in values.items()} == {tag: reported for tag in TAGS}
    best = Path(json.loads(Path(p["best"]).read_text())["checkpoint"])
    assert (best / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The evaluation report shows the curves too.
    page = (best / "report_val" / "index.html").read_text(encoding="utf-8")
    assert "training and validation loss per step" in page


def test_the_exported_savedmodel_captions_like_the_job_without_capray(run: dict) -> None:
    import subprocess
    import sys

    exported = run["work"] / "exported"
    captions = output_paths(run["cfg"])["captions"]
    # A fresh process that never imports capray: what a deployment has.
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/savedmodel_agreement.py"), str(exported), captions],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=run["work"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["capray_imported"] is False and result["images"] == 12
    assert result["agreement"] >= 0.95, result["differ"]
    shown = subprocess.run(
        [
            str(Path(sys.executable).parent / "saved_model_cli"),
            "show",
            "--dir",
            str(exported),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for line in ("inputs['images']", "DT_STRING", "outputs['caption']", "outputs['log_prob']", "outputs['num_tokens']"):
        assert line in shown.stdout
    assert run["export_refused"] == 9  # the folder exists and --overwrite was not given (docs/cli.md)


def _greedy_captions(checkpoint_uri: str, cfg) -> dict[str, str]:
    """Each validation image's greedy caption from the checkpoint, decoded directly."""
    from capray import checkpoint
    from capray.featurestore import decode_features

    model, tokenizer, _, _ = checkpoint.load(checkpoint_uri)
    split = pd.read_parquet(output_paths(cfg)["split"])
    val = set(split.query("split == 'val'")["image"])
    table = pq.read_table(output_paths(cfg)["features"]).to_pandas()
    table = table[table["image"].isin(val)]
    feats = decode_features(list(table["features"]), table["dtype"].iloc[0])
    tokens = model.greedy(feats, tokenizer.max_length - 1, start_id=tokenizer.start_id, end_id=tokenizer.end_id)[
        0
    ].numpy()
    return {image: tokenizer.decode(t) for image, t in zip(table["image"], tokens)}
