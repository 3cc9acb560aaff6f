"""`capray overview`'s driver memory against the number of rows: it must not grow with them.

A benchmark, not a test: `.venv/bin/python bench/overview.py [--rows 100000 1000000] [--files 100]`.
For each row count it writes a stand-in caption output on local disk (`--files` Parquet files of
random captions, log-probs, token counts and 1% errors, with the footer stats and the index a job
writes), then runs `capray.overview.collect` (the Ray tasks and the driver's merge, no
thumbnails) with `tracemalloc` tracing the driver's Python heap; it prints the rows, the seconds
and the driver's peak. Ray's own processes are not the driver's heap and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit import cpu_model

from capray import progress, shards
from capray.captioning import SCHEMA
from capray.config import load_config


def standin(folder: str, rows: int, files: int) -> None:
    """`files` caption files of `rows` rows in all, with their stats footers and the index."""
    rng = np.random.default_rng(0)
    per = rows // files
    entries = []
    for f in range(files):
        sid = f"list-{f:06d}.{f:012x}"
        tokens = rng.integers(2, 20, per).astype(np.int32)
        failed = rng.random(per) < 0.01
        table = pa.table(
            {
                "image": [f"s3://bucket/photos/{f:06d}/{i:07d}.jpg" for i in range(per)],
                "caption": pa.array(np.where(failed, None, "a dog runs on the grass")),
                "log_prob": pa.array(-rng.random(per) * tokens, pa.float32(), mask=failed),
                "num_tokens": pa.array(tokens, mask=failed),
                "strategy": ["greedy"] * per,
                "model": ["ckpt"] * per,
                "error": pa.array(np.where(failed, "cannot decode image: truncated", None)),
            },
            schema=SCHEMA,
        )
        stats = {"shard": sid, "rows": per, "copied": 0, "started": 1000.0 + f, "ended": 1010.0 + f}
        pq.write_table(
            table.replace_schema_metadata({progress.STATS_KEY: json.dumps(stats)}),
            os.path.join(folder, f"{sid}.parquet"),
        )
        entries.append(
            {
                "id": sid,
                "kind": "listing",
                "source": "",
                "lo": "",
                "hi": "",
                "rows": per,
                "failed": -1,
                "state": "current",
            }
        )
    shards.write_index(folder, None, entries, {"format": shards.FORMAT, "input": "s3://bucket/photos", "settings": {}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--files", type=int, default=100)
    args = parser.parse_args()
    import ray

    from capray.overview import collect
    from capray.runtime import init_ray

    cfg = load_config(None, ["ray.local_cpus=2"])
    init_ray(cfg)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Ray CPUs {ray.cluster_resources().get('CPU')}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as folder:
            standin(folder, rows, args.files)
            tracemalloc.start()
            t0 = time.time()
            s = collect(folder, cfg, 24)
            seconds = time.time() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert s.rows == rows // args.files * args.files and len(s.least) == 24
            print(
                f"rows {s.rows:>11,} in {s.files} files: {seconds:6.1f} s, {s.rows / seconds:,.0f} rows/s, "
                f"driver peak (tracemalloc) {peak / 2**20:.2f} MiB"
            )


if __name__ == "__main__":
    main()
