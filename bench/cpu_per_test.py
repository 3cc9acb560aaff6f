"""Where a test run's CPU goes, per test: a pytest plugin, and the report of what it recorded.

Each pytest process (each xdist worker too) samples, every 0.25 s, the CPU time of itself and of
every process below it (Ray's daemons and workers, subprocess jobs, Java...), and charges what
they used since the last sample to the test running then; it also counts the processes that
appeared during each test, by title (`ray::MapWorker(...)`, `ray::RayTrainWorker`...). A process
that starts and ends between two samples is missed; the totals agree with the machine's busy time
to within a few percent.

    PYTHONPATH=bench CPU_PER_TEST=outputs/cpu-per-test .venv/bin/python -m pytest -p cpu_per_test \\
        -n 2 --dist loadfile --no-loadscope-reorder tests
    .venv/bin/python bench/cpu_per_test.py outputs/cpu-per-test     # CPU-s by file and by test

Linux only (/proc). Not a test: it measures tests (docs/testing.md#where-cis-time-goes).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")
ME = os.getpid()
_lock = threading.Lock()
_current = ["<session>"]
_active: list[bool] = []  # set in a process that samples (not the xdist controller: it runs no tests)
_seen: dict[tuple[int, str], float] = {}  # (pid, start time) -> CPU-s charged so far
_born: dict[tuple[int, str], str] = {}  # (pid, start time) -> the test running when it was first seen
_title: dict[tuple[int, str], str] = {}
_cpu: collections.Counter[str] = collections.Counter()


def processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU-s used, start time) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended while we looked
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / HZ, fields[19])
    return out


def title(pid: int) -> str:
    """A short name for a process: Ray's title, or the program and its first arguments without
    their folders (no machine's path is printed)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    argv = [a for a in argv if a]
    if not argv:
        return ""
    if argv[0].startswith("ray::") or " " in argv[0]:  # a title the process set (Ray's workers, its dashboard's)
        return argv[0].split()[0]
    # The program, then its first two arguments that are not options (a script, a module, a jar).
    words = [argv[0], *[a for a in argv[1:] if not a.startswith("-")][:2]]
    return " ".join(os.path.basename(w) for w in words)[:70]


def _sample() -> None:
    procs = processes()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (parent, _, _) in procs.items():
        children[parent].append(pid)
    mine, todo = [], [ME]
    while todo:
        pid = todo.pop()
        mine.append(pid)
        todo.extend(children.get(pid, ()))
    with _lock:
        test = _current[0]
        for pid in mine:
            if pid not in procs:
                continue
            _, cpu, start = procs[pid]
            key = (pid, start)
            if key not in _seen:
                _seen[key] = cpu if pid == ME else 0.0  # this process: from now on
                _born[key] = test
            name = title(pid)
            if name:  # Ray renames its workers (`ray::IDLE`, then the actor's or task's name)
                _title[key] = name
            if cpu > _seen[key]:
                _cpu[test] += cpu - _seen[key]
                _seen[key] = cpu


def _loop() -> None:
    while True:
        time.sleep(0.25)
        try:
            _sample()
        except (OSError, ValueError, IndexError):  # a process read as it ended: skip this sample
            continue


def pytest_configure(config: Any) -> None:
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        return  # the xdist controller runs no tests (its workers' hooks are relayed to it); they sample
    _active.append(True)
    threading.Thread(target=_loop, daemon=True).start()


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if not _active:
        return
    _sample()
    with _lock:
        _current[0] = nodeid


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    if not _active:
        return
    _sample()
    with _lock:
        _current[0] = "<between tests>"


def pytest_sessionfinish(session: Any) -> None:
    if not _active:
        return
    _sample()
    started: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for key, test in _born.items():
        started[test][_title.get(key, "?")] += 1
    out = Path(os.environ.get("CPU_PER_TEST", "outputs/cpu-per-test"))
    out.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{name}-{ME}.json").write_text(json.dumps({"cpu": _cpu, "started": started}))


def report(folder: str) -> None:
    """Print CPU-s by file and the 25 costliest tests, with the processes each started."""
    cpu: collections.Counter[str] = collections.Counter()
    started: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for f in Path(folder).glob("*.json"):
        data = json.loads(f.read_text())
        cpu.update(data["cpu"])
        for test, titles in data["started"].items():
            started[test].update(titles)
    by_file: collections.Counter[str] = collections.Counter()
    for test, seconds in cpu.items():
        by_file[test.split("::")[0]] += seconds
    print(f"{sum(cpu.values()):.0f} CPU-s in all (pytest processes and every process below them)")
    for name, seconds in by_file.most_common():
        if seconds >= 1:
            print(f"{seconds:8.1f}  {name}")
    print()
    for test, seconds in cpu.most_common(25):
        kinds = ", ".join(f"{n} {t}" for t, n in started[test].most_common(4) if t.startswith("ray::"))
        print(f"{seconds:8.1f}  {test}\n          started: {kinds or '-'}")


if __name__ == "__main__":
    report(sys.argv[1] if len(sys.argv) > 1 else "outputs/cpu-per-test")
