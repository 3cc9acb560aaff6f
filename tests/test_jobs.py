"""The jobs/ entry points as users run them: `ray job submit --working-dir .` to a Ray head
started with `ray start --head` (Job Submission API), and plain `python jobs/<job>.py`."""

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
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A real extraction, kept small: 24 synthetic scenes through the random InceptionV3.
EXTRACT = ["configs/demo.yaml", "data.synthetic_images=24", "extract.batch_size=8"]


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
        from ray.job_submission import JobSubmissionClient

        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"ray start exited: {(Path(temp) / 'ray_start.log').read_text()[-2000:]}"
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)  # polling interval while the dashboard starts (not synchronisation)
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


@pytest.mark.timeout(600)  # a whole training job and an evaluation, on the extract job's features
def test_train_then_evaluate_submitted_with_working_dir_and_the_checkpoint_loads(
    ray_head: dict, extract_job: dict
) -> None:
    from ray.job_submission import JobStatus

    import capray

    assert extract_job["status"] == JobStatus.SUCCEEDED, "the extract job failed: see its own test"
    client, work = ray_head["client"], extract_job["work"]
    settings = [
        *EXTRACT,
        f"work_dir={work}",
        "name=submitted",
        "model.embedding_dim=16",
        "model.units=32",
        "train.batch_size=8",
        "train.epochs=1",
        "ray.num_workers=1",
        "evaluate.strategies=[greedy]",
        "evaluate.report_images=0",
    ]
    # One submission, one upload of the working dir: both entry points as a user would run them.
    args = shlex.join(settings)
    entrypoint = f"python jobs/train.py {args} && python jobs/evaluate.py {args}"
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    best = work / "runs" / "submitted" / "best"
    assert f"[capray] train: best checkpoint {best}" in logs, logs[-3000:]
    result = json.loads((best / "eval_val.json").read_text())
    assert result["checkpoint"] == str(best) and result["images"] > 0
    assert f"evaluate: val split, {result['images']} images, checkpoint {best}" in logs

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
