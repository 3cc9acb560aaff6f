"""Ray Data's Parquet footer pool, 2 actors (capray's setting, `capray.runtime`) against Ray's 32: a
whole pass over a feature folder of many files, side by side in one run.

A benchmark, not a test: `.venv/bin/python bench/footers.py [--files 10000] [--pools 2 32] [--repeat 2]`.
The folder is a stand-in: `--files` Parquet files of `--rows` rows each with the features
table's columns (`capray.featurestore.SCHEMA`) and a 64-byte `features` value, so that what is
measured is listing and opening files, not decoding features. It is written once to local disk
and to a moto S3 server on 127.0.0.1 (every footer read an HTTP request). Each (store, pool)
scenario runs in its own process with its own local Ray (`ray.local_cpus=2`), the pool set by
RAY_DATA_PARQUET_FOOTER_NUM_ACTORS before Ray starts, and times two passes of
the folder as `capray.featurestore.read_features` reads it (`ray.data.read_parquet` through
`capray.storage`, rows with an error filtered out; only the `image` column, so that its size check
of each feature value is not run on the stand-ins) read to the end: the first pass pays for the
pool's processes and Ray Data's own actors, the second for the pool again. Scenarios run
interleaved, `--repeat` rounds; the table shows each one's median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _table(index: int, rows: int) -> pa.Table:
    from capray.featurestore import SCHEMA

    columns = {
        "image": [f"f{index:06d}/{r:04d}.jpg" for r in range(rows)],
        "features": [bytes(64)] * rows,
        "dtype": ["float16"] * rows,
        "shape": [[64, 2048]] * rows,
        "error": pa.nulls(rows, pa.string()),
    }
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA if f.name in columns})


def write_folders(root: Path, files: int, rows: int, endpoint: str) -> dict[str, str]:
    """The stand-in folder on local disk and in the moto bucket `bench`: {store: folder}."""
    import pyarrow.fs as pafs

    local = root / "features"
    local.mkdir(parents=True)
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing", region="us-east-1"
    )
    for i in range(files):
        table = _table(i, rows)
        pq.write_table(table, local / f"part-{i:06d}.parquet")
        pq.write_table(table, f"bench/features/part-{i:06d}.parquet", filesystem=s3)
    return {"local": str(local), "s3": "s3://bench/features"}


def scenario(folder: str, endpoint: str) -> dict:
    """In its own process: two whole passes over `folder` on a fresh local Ray."""
    import ray
    from ray.data.expressions import col

    from capray import storage
    from capray.config import load_config
    from capray.runtime import init_ray

    settings = [
        f"storage.endpoint_url={endpoint}",
        "storage.access_key_id=testing",
        "storage.secret_access_key=testing",
    ]
    cfg = load_config(None, ["ray.local_cpus=2", "ray.local_dashboard=false", "storage.region=us-east-1", *settings])
    init_ray(cfg)
    passes = []
    for _ in range(2):
        start, rows = time.perf_counter(), 0
        fs, path = storage.filesystem(folder, cfg.storage)
        ds = ray.data.read_parquet(path, filesystem=fs, columns=["image", "error"]).filter(expr=col("error").is_null())
        for batch in ds.iter_batches(batch_size=4096):
            rows += len(batch["image"])
        passes.append(time.perf_counter() - start)
    readers = sum(a["ActorClassName"] == "FooterReader" for a in ray._private.state.actors().values())
    ray.shutdown()
    return {"first_s": passes[0], "second_s": passes[1], "rows": rows, "footer_actors": readers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--pools", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scenario", nargs=2, help=argparse.SUPPRESS)  # FOLDER ENDPOINT (child process)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(scenario(*args.scenario)))
        return

    sys.path.insert(0, str(REPO / "bench"))
    from moto_s3 import moto_server

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.files} files of {args.rows} rows")
    with tempfile.TemporaryDirectory() as tmp, moto_server(lambda m: "GET" in m) as (endpoint, gets):
        start = time.perf_counter()
        folders = write_folders(Path(tmp), args.files, args.rows, endpoint)
        print(f"stand-in written to local disk and moto S3 in {time.perf_counter() - start:.0f} s")
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeat):
            for store, folder in folders.items():
                for pool in args.pools:
                    env = {**os.environ, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(pool)}
                    env.pop("RAY_ADDRESS", None)
                    before = gets.count
                    done = subprocess.run(
                        [sys.executable, __file__, "--scenario", folder, endpoint],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    assert result["rows"] == args.files * args.rows, result
                    result["gets"] = gets.count - before
                    results.setdefault((store, pool), []).append(result)
        print(
            "\n| store | footer actors | first pass (s) | second pass (s) | FooterReader actors started | S3 GETs, both passes |"
        )
        print("|---|---|---|---|---|---|")
        for (store, pool), runs in results.items():
            first = statistics.median(r["first_s"] for r in runs)
            second = statistics.median(r["second_s"] for r in runs)
            get = runs[0]["gets"] if store == "s3" else "-"
            print(f"| {store} | {pool} | {first:.1f} | {second:.1f} | {runs[0]['footer_actors']} | {get} |")


if __name__ == "__main__":
    main()
