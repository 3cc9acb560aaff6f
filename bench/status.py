"""`capray status` over 10^5 shards on the S3 server: wall time and the requests it makes.

A benchmark, not a test: `.venv/bin/python bench/status.py [--shards 100000] [--since-flush 100]`.
A moto S3 server in this process holds a stand-in output folder of `--shards` shards, all written
(tiny Parquet files whose footers hold their stats: tests/builders.py's `standin_output`), the plan
`_shards.parquet`, the driver's roll-up holding all but the last `--since-flush` shards (the ones
finished since its last flush) and its heartbeat. `capray status --json` then runs in this
process; the server's access log counts its requests by kind. Goal (issue 27): under 30 s, and
O(shards / 1,000) LIST requests plus the objects it reads (plan, roll-up, heartbeat, and the
footers of the shards the roll-up does not hold).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from audit import cpu_model
from builders import standin_output
from moto_s3 import RequestCounter, bench_settings, moto_server

_REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+)')


def _kind(line: str) -> str:
    m = _REQUEST.search(line)
    if not m:
        return ""
    method, target = m.groups()
    if method == "GET" and ("list-type=" in target or "delimiter=" in target or target.rstrip("/").count("/") == 1):
        return "LIST"
    return method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--since-flush", type=int, default=100, help="shards finished since the roll-up's last flush")
    parser.add_argument("--show", action="store_true", help="print the first requests of `status` and a profile")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}", flush=True)
    import contextlib
    import cProfile
    import io
    import pstats

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from capray import cli
    from capray.config import load_config

    counts: dict[str, int] = {}
    seen: list[str] = []

    def count(line: str) -> bool:
        k = _kind(line)
        if k:
            counts[k] = counts.get(k, 0) + 1
            if len(seen) < 12:
                seen.append(line[-160:])
        return bool(k)

    with moto_server(count) as (endpoint, counter):
        assert isinstance(counter, RequestCounter)
        settings = bench_settings(endpoint)
        cfg = load_config(None, settings)
        # Straight into the server's in-process store: 10^5 PUTs over HTTP would take the moto
        # server many minutes, and they are not what is measured.
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

        def put(uri: str, data: bytes) -> None:
            bucket, _, key = uri[len("s3://") :].partition("/")
            backend.put_object(bucket, key, data)

        n, lag = args.shards, args.since_flush
        # (bucket, written, rolled up, heartbeat): a job at its end whose roll-up is one flush
        # behind (the shards not rolled up are looked up one by one), and a job killed half-way
        # before its last flush (too many unknown shards: found by a listing).
        scenarios = {
            "end, roll-up one flush behind": ("bench", n, n - lag, 0.0),
            "killed half-way": ("bench-killed", n // 2, n // 2 - lag, time.time() - 3600),
        }
        for name, (bucket, done, rolled, beat) in scenarios.items():
            if bucket != "bench":
                backend.create_bucket(bucket, "us-east-1")
            out = f"s3://{bucket}/captions"
            t0 = time.perf_counter()
            standin_output(out, cfg.storage, n, done, rolled, heartbeat_at=beat, put=put, threads=1)
            made = time.perf_counter() - t0
            counts.clear()
            seen.clear()
            buf = io.StringIO()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                prof.enable()
                code = cli.main(["status", out, *settings, "--json"])
                prof.disable()
            wall = time.perf_counter() - t0
            s = json.loads(buf.getvalue())
            assert code == 0 and s["shards"]["done"] == done and s["shards"]["stats_unknown"] == 0, s["shards"]
            result = {
                "scenario": name,
                "shards": n,
                "done": done,
                "not_rolled_up": n - rolled,
                "wall_s": round(wall, 1),
                "requests": dict(sorted(counts.items())),
                "stats_from_footers": s["shards"]["stats_from_footers"],
                "stand_in_written_s": round(made),
            }
            print(json.dumps(result), flush=True)
            if args.show:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
                print("\n".join(seen))


if __name__ == "__main__":
    main()
