"""Process trees from /proc, for the system tests that kill part of a Ray instance: the
processes below a job or a node's raylet, which of them are a given kind of Ray worker, the kill
of a whole job, and the end of a killed job's Ray instance."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def in_session(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(session) == sid and state not in "ZX":
            pids.append(int(stat.parent.name))
    return pids


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job started with `start_new_session=True` and every process of its session, and
    return once none is left. Killing only its process group is not the whole job: Ray puts each
    worker (a Train controller or worker, a Data actor) in a process group of its own, and such a
    worker outlives its driver by a moment, long enough to register a checkpoint or publish a
    file after "the kill"."""
    deadline = time.monotonic() + 60
    while pids := in_session(proc.pid):
        assert time.monotonic() < deadline, f"processes {pids} of the killed job are still alive"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)  # their exit is another process tree's: there is nothing to wait on
    proc.wait()


def titled(pids: list[int], title: bytes) -> list[int]:
    """The processes among `pids` whose Ray title starts with `title` (e.g. b"ray::RayTrainWorker")."""
    found = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                found.append(pid)
        except OSError:
            continue
    return found


def with_text(text: str) -> list[str]:
    """PIDs whose command line contains `text`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(cmdline.parent.name)
        except OSError:  # the process exited while we looked
            pass
    return pids


def wait_for_ray_to_exit(log: Path) -> None:
    """Until the processes of the Ray instance that a finished or killed job started (its session,
    named in the job's log `log`) are gone: their shutdown takes CPU for seconds, which the next
    timed job on 2 cores would pay for."""
    found = re.search(r"/(session_[\w-]+)", log.read_text())
    if not found:
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and with_text(found.group(1)):
        time.sleep(0.5)  # polling another process tree's exit: there is nothing to wait on
