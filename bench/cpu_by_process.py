"""Where a command's CPU goes, by process: run it, and charge every process it started to its title.

    .venv/bin/python bench/cpu_by_process.py -- .venv/bin/python -m pytest -q tests/test_jobs.py

Every 0.25 s it reads the CPU time of each process that started after it (the command, Ray's
daemons and workers, subprocess jobs, Java...) and, at the end, prints the CPU-s by title with the
number of processes: `ray::MapWorker(...)`, `ray::RayTrainWorker`, `java meteor-1.5.jar`...
Ray renames a worker when it takes an actor or a task, so a process is counted under its last
title (an actor's start-up with the actor; a worker idle at its last sample under `ray::IDLE`,
with any tasks it ran before). It also prints the machine's busy time from /proc/stat over the
same span, which includes processes that started before it; on an otherwise idle machine the two
agree to within a few percent (a process that starts and ends between two samples is missed). The command's exit code is returned.

Linux only (/proc). Not a test: it measures tests and jobs (docs/testing.md#where-cis-time-goes).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cpu_per_test import HZ, processes, title


def busy_seconds() -> float:
    """The machine's busy CPU-s since boot (all cores): /proc/stat's first line less idle and iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / HZ


def cpu_model() -> str:
    """`<cores> cores, <model name>`, to print beside every measurement (machines differ)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{os.cpu_count()} cores, {line.split(':', 1)[1].strip()}"
    return f"{os.cpu_count()} cores"


def uptime() -> float:
    """Seconds since boot, the clock of the processes' start times in /proc/<pid>/stat."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Sampler:
    """Samples, by title, the CPU that the processes started since `since` (seconds since boot;
    default: now) use between `start` and `stop`; not its own process's."""

    def __init__(self, interval: float = 0.25, since: float | None = None):
        self.interval = interval
        self.since = ((uptime() if since is None else since) - 0.5) * HZ  # in clock ticks
        self.cpu: dict[tuple[int, str], float] = {}
        self.base: dict[tuple[int, str], float] = {}
        self.names: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for pid, (_, cpu, start) in processes().items():
            if int(start) < self.since or pid == os.getpid():
                continue
            key = (pid, start)
            self.cpu[key] = cpu
            name = title(pid)
            if name:
                self.names[key] = name

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except (OSError, ValueError, IndexError):  # a process read as it ended: skip this sample
                continue

    def start(self) -> Sampler:
        self.sample()
        self.base = dict(self.cpu)  # what the processes already running had used before
        self.busy0, self.t0 = busy_seconds(), time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.wall = time.monotonic() - self.t0
        self.busy = busy_seconds() - self.busy0

    def report(self, at_least: float = 0.2) -> str:
        by_title: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        for key, cpu in self.cpu.items():
            name = self.names.get(key, "?")
            by_title[name] += cpu - self.base.get(key, 0.0)
            count[name] += 1
        lines = [
            f"{cpu_model()}; {self.wall:.1f} s, machine busy {self.busy:.1f} CPU-s, "
            f"{sum(by_title.values()):.1f} CPU-s in the processes started since",
        ]
        lines += [f"{cpu:8.1f} {count[name]:4d}  {name}" for name, cpu in by_title.most_common() if cpu >= at_least]
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- and the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to measure after --")
    sampler = Sampler(args.interval).start()
    code = subprocess.call(command)
    sampler.stop()
    print(sampler.report(), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
