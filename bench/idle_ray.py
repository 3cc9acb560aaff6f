"""What a local Ray instance costs while it waits: the CPU of its processes over a minute of nothing.

    .venv/bin/python bench/idle_ray.py [--seconds 60]
    RAY_memory_monitor_refresh_ms=0 .venv/bin/python bench/idle_ray.py   # a Ray setting, tried

Starts Ray as the test session does (`tests/conftest.py`: 2 CPUs, no dashboard), runs one small
Ray Data pass (which starts Ray Data's stats and autoscaling actors, as every job does), waits 5 s
for it to settle, then samples every process started since it began (`bench/cpu_by_process.py`; not
itself) for `--seconds` and prints their CPU by title. Each of `make test`'s two processes keeps such an
instance for its whole run, and each subprocess job starts one (docs/testing.md#where-cis-time-goes).
"""

from __future__ import annotations

import argparse
import time

import ray
from cpu_by_process import Sampler, uptime

from capray.config import load_config
from capray.runtime import init_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to measure the idle instance")
    args = ap.parse_args()
    began = uptime()
    init_ray(load_config(None, ["ray.local_cpus=2", "ray.local_dashboard=false"]))
    ray.data.range(100).map_batches(lambda batch: batch).materialize()
    time.sleep(5)  # the pass's tasks and actors settle; not synchronisation, a measurement window
    sampler = Sampler(since=began).start()
    time.sleep(args.seconds)
    sampler.stop()
    print(sampler.report())
    ray.shutdown()


if __name__ == "__main__":
    main()
