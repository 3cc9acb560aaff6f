"""Shared fixtures: a real local Ray instance, real object-storage servers on 127.0.0.1 (moto for
S3, fake-gcs-server for Google Cloud Storage, Azurite for Azure Blob), and test data built once per
session (a tiny checkpoint, extracted synthetic features)."""

from __future__ import annotations

import collections
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import extract_synthetic, write_tiny_checkpoint
from emulators import S3, Emulator, free_port

from capray.config import load_config

REPO = Path(__file__).resolve().parents[1]
FLICKR_DEV = REPO.parent / "shared" / "data" / "flickr8k-dev"


# What makes a test one of the whole-job tests (seconds to minutes each) rather than a unit test:
# one of these fixtures, or a timeout of its own (the subprocess jobs declare theirs).
JOB_FIXTURES = {"ray_local", "ray_head", "synthetic_features"}


def _is_job_test(item: pytest.Item) -> bool:
    return (
        bool(JOB_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        or item.get_closest_marker("timeout") is not None
    )


# Session fixtures that run whole jobs (tests/system/conftest.py), and the files that use each:
# those files are one unit of `--dist loadfile` (pytest_xdist_make_scheduler below), so that the
# jobs run once, in one process.
SHARED_RUNS = {"jobs_on_s3": {"test_security.py", "test_job_logs.py", "test_train_on_s3.py"}}
SHARED_UNITS = {name: fixture for fixture, names in SHARED_RUNS.items() for name in names}
# The reliability suite's files that take minutes, longest first (CI's durations,
# docs/testing.md#where-cis-time-goes): its two processes start on these.
SYSTEM_ORDER = [
    "test_train_multinode.py",
    "test_caption_progress.py",
    "test_train_resume.py",
    "test_security.py",  # with test_job_logs.py and test_train_on_s3.py: the jobs_on_s3 run
    "test_storage_faults.py",
    "test_multinode.py",
    "test_train_faults.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order in which `make test` and `make test-system` hand their files to their two
    processes (`--dist loadfile --no-loadscope-reorder`: a file's module fixtures are built
    once): the longest first, the unit-test files last, so that a run does not end on a long
    file in one process while the other has nothing left to do. In `make test`, the files with
    the most job tests count as the longest (xdist's own order, by number of tests, put the long
    files with a few job tests last); the reliability suite's few, long files go in
    SYSTEM_ORDER. A file that uses a SHARED_RUNS fixture must be one of its unit's files."""
    jobs: collections.Counter[str] = collections.Counter()
    for item in items:
        jobs[item.path.name] += _is_job_test(item)
    for item in items:
        for fixture in SHARED_RUNS.keys() & set(getattr(item, "fixturenames", ())):
            if item.path.name not in SHARED_RUNS[fixture]:
                raise pytest.UsageError(
                    f"{item.path.name} uses {fixture}: add it to SHARED_RUNS in tests/conftest.py "
                    "(else another xdist process would run those jobs again)"
                )
    rank = {name: i for i, name in enumerate(SYSTEM_ORDER)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -jobs[item.path.name]))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, but the files of one SHARED_RUNS fixture are one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            fixture = SHARED_UNITS.get(path.rsplit("/", 1)[-1])
            return f"{fixture} fixture" if fixture else path

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the whole session (starting Ray costs seconds), without the
    dashboard's processes (nothing here reads it; `test_jobs.py`'s `ray start --head` has one)."""
    if os.environ.get("CAPRAY_TEST_FAST"):
        pytest.fail(
            "`make test-fast` runs no Ray: this test belongs in `make test` only (see the Makefile's FAST list)"
        )
    import ray

    from capray.runtime import init_ray

    init_ray(load_config(None, ["ray.local_cpus=2", "ray.local_dashboard=false"]))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """A real S3-protocol server (moto's ThreadedMotoServer) for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A real Google Cloud Storage emulator (fake-gcs-server, from the `test` extra) for the session."""
    server = Emulator("gcs", tmp_path_factory.mktemp("gcs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A real Azure Blob emulator (Azurite, from npm: `make test` installs it) for the session."""
    server = Emulator("azure", tmp_path_factory.mktemp("azure")).start()
    yield server
    server.stop()


@pytest.fixture
def flickr_dev() -> Path:
    """../shared/data/flickr8k-dev, or skip when this machine does not have it."""
    if not (FLICKR_DEV / "captions.csv").is_file():
        pytest.skip(f"{FLICKR_DEV} not present")
    return FLICKR_DEV


def _once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per pytest run, also under pytest-xdist (`make test` runs 2 worker
    processes): the first worker to ask builds it under a file lock, the others block on the lock
    and then reuse the folder. Users only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, shared by the workers' own popen-gwK/
    return _built_once(root, name, build)


def _built_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`root/name`, built by `build` unless a finished build is there; under a file lock."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (root / f"{name}.done").touch()
    return folder


# What a cached fixture's contents depend on: a change to any of these files builds it again.
BUILT_FROM = ["capray/**/*.py", "configs/demo.yaml", "tests/builders.py", "pyproject.toml"]


def _code_digest() -> str:
    digest = hashlib.sha256()
    for pattern in BUILT_FROM:
        for path in sorted(REPO.glob(pattern)):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _once_per_code(name: str, build: Callable[[Path], object]) -> Path:
    """Like `_once_per_run`, but kept across pytest runs in `outputs/test-cache/` (git-ignored)
    while the code it is built from is unchanged (BUILT_FROM): `make test-system` reuses what
    `make test` built a minute earlier, as the next `make test` does. A half-built folder (a
    killed run) has no `.done` mark and is built again."""
    return _built_once(REPO / "outputs" / "test-cache" / _code_digest(), name, build)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained, complete checkpoint for the tests of the caption job's plumbing."""
    return str(_once_per_run(tmp_path_factory, "tinyckpt", write_tiny_checkpoint))


@pytest.fixture(scope="session")
def synthetic_features(request: pytest.FixtureRequest) -> Path:
    """A work dir with synthetic scenes and their extracted features (a Ray job of ~50 s), made
    once per version of the code; training tests read them through `builders.reuse_features`."""

    def build(folder: Path) -> None:
        request.getfixturevalue("ray_local")  # Ray only when the features are extracted here
        extract_synthetic(folder)

    return _once_per_code("synthetic", build)
