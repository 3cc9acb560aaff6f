"""Control-plane scale of the image jobs: driver memory, time to the first model batch and rows/s at
1M and 4M images, with image reading/decoding and the model replaced by a cheap stand-in.

A benchmark, not a test: `.venv/bin/python bench/scale.py` (about 20 minutes on 2 cores; inputs are
generated under --dir, 1M empty files included). Each scenario runs in its own process with its
own local Ray, so driver peak RSS is measured above that process's idle `ray.init` driver:
  manifest-1M        100 Parquet manifest files of 10,000 rows
  manifest-4M        400 such files
  folder-1M          a local tree of 1,000 folders x 1,000 files, listed by Ray tasks
  manifest-4M-half   manifest-4M again after half of its output files were deleted
and, separately, a 50,000-object prefix on a moto S3 server, whose LIST requests are counted.
Goals (issue 14): RSS above idle <= 300 MB at 1M and 4M/1M <= 1.3; first batch 4M/1M <= 1.5;
half-done 4M <= fresh 4M; >= 10,000 rows/s; LIST requests ~ objects / 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FILE_ROWS = 10_000


def _rss() -> int:
    """This process's resident memory in bytes (from /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """This process's peak resident memory, sampled every 50 ms from creation until `stop()`,
    above its resident memory at creation (`idle`)."""

    def __init__(self) -> None:
        self.idle = self.peak = _rss()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.05)

    def stop(self) -> float:
        """MB above idle at the peak."""
        self._stop.set()
        return (self.peak - self.idle) / 2**20


def make_manifests(folder: Path, images: int) -> None:
    """`images` rows of (image, id) in Parquet files of FILE_ROWS rows."""
    if (folder / "_done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images // FILE_ROWS):
        ids = range(k * FILE_ROWS, (k + 1) * FILE_ROWS)
        pq.write_table(
            pa.table({"image": [f"s3://bucket/images/{i:09d}.jpg" for i in ids], "id": list(ids)}),
            folder / f"{k:05d}.parquet",
        )
    (folder / "_done").write_text("")


def make_tree(folder: Path, dirs: int, per_dir: int) -> None:
    """dirs x per_dir empty .jpg files."""
    if (folder / ".done").exists():
        return

    def one(d: int) -> None:
        sub = folder / f"{d:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_dir):
            (sub / f"{i:05d}.jpg").touch()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(dirs)))
    (folder / ".done").write_text("")


def scenario(args: argparse.Namespace) -> None:
    """One job in this process: the real planner, pipeline and writer; a stand-in model."""
    import ray

    from capray import inputs, pipeline, worker
    from capray.config import load_config
    from capray.runtime import init_ray

    class StandInWorker(worker.ShardWorker):
        """The real worker (shard reading, dedupe, writer, summary) without reading and decoding."""

        def _submit(self, table: pa.Table) -> list:
            return []

        def _run_model(self, table: pa.Table, futures: list) -> pa.Table:
            return worker.with_input_columns(self.model({"image": table["image"]}), table)

    cfg = load_config(None, [f"work_dir={args.work}", "ray.local_cpus=2", f"inputs.shard_rows={FILE_ROWS}", *args.set])
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    time.sleep(2)  # let the driver settle after ray.init before the idle baseline
    rss = PeakRSS()
    marker = Path(args.work) / "first_batch"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    t0 = time.time()
    plan = inputs.plan(cfg, args.input, str(Path(args.work) / "inputs"))
    t_plan = time.time() - t0
    kwargs = {"marker": str(marker)}
    schema = pa.schema([("image", pa.string()), ("caption", pa.string()), ("error", pa.string())])
    s = pipeline.run(
        cfg, plan, args.output, StandInModel, kwargs, cfg.caption, schema, "scale", worker_cls=StandInWorker
    )
    wall = time.time() - t0
    rss_mb = rss.stop()
    first = float(marker.read_text()) - t0 if marker.exists() else float("nan")
    print(
        json.dumps(
            {
                "rows": s["written"],
                "shards": s["shards"],
                "shards_done_before": s["shards_done_before"],
                "computed": s["computed"],
                "copied": s["copied"],
                "rss_mb": rss_mb,
                "idle_mb": rss.idle / 2**20,
                "first_batch_s": first,
                "plan_s": t_plan,
                "wall_s": wall,
                "rows_per_s": s["written"] / wall,
            }
        )
    )


class StandInModel:
    """Stands in for InceptionV3 + decoder: one caption per row, no pixels."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, batch: dict) -> pa.Table:
        if self.marker:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(time.time()).encode())
                os.close(fd)
            except FileExistsError:
                pass
            self.marker = ""
        n = len(batch["image"])
        return pa.table({"image": batch["image"], "caption": ["a stand-in"] * n, "error": pa.nulls(n, pa.string())})


def run_scenario(name: str, inp: Path, out: Path, work: Path, extra: list[str] = ()) -> dict:
    """Run one scenario in a fresh process; its JSON line."""
    cmd = [sys.executable, __file__, "--scenario", "--input", str(inp), "--output", str(out), "--work", str(work)]
    for e in extra:
        cmd += ["--set", e]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    )
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{name:18s} rows {result['rows']:>9,}  shards {result['shards']:>5} ({result['shards_done_before']} done before)  "
        f"driver +{result['rss_mb']:6.1f} MB (idle {result['idle_mb']:.0f} MB)  plan {result['plan_s']:6.2f} s  "
        f"first batch {result['first_batch_s']:6.2f} s  wall {result['wall_s']:7.1f} s  {result['rows_per_s']:>8,.0f} rows/s",
        flush=True,
    )
    return result


def s3_listing(objects: int, work: Path) -> dict:
    """Plan a prefix of `objects` images (folders of 1,000) on a moto server; LIST requests counted."""
    import boto3
    from moto_s3 import bench_settings, moto_server

    from capray import inputs
    from capray.config import load_config
    from capray.runtime import init_ray

    is_list = lambda msg: "GET /" in msg and ("list-type=2" in msg or "delimiter=" in msg or "prefix=" in msg)
    with moto_server(is_list) as (endpoint, lists):
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: client.put_object(Bucket="bench", Key=f"photos/{i // 1000:03d}/{i:06d}.jpg", Body=b""),
                    range(objects),
                )
            )
        cfg = load_config(
            None, [f"work_dir={work}", *bench_settings(endpoint), f"inputs.shard_rows={FILE_ROWS}", "ray.local_cpus=2"]
        )
        init_ray(cfg)
        shutil.rmtree(work / "inputs", ignore_errors=True)
        lists.count = 0
        t0 = time.time()
        plan = inputs.plan(cfg, "s3://bench/photos", str(work / "inputs"))
        seconds = time.time() - t0
        print(
            f"s3 prefix          {plan.rows:,} objects listed in {seconds:.1f} s with {lists.count} LIST requests "
            f"({plan.rows / max(lists.count, 1):.0f} objects per LIST), {len(plan.shards)} shards",
            flush=True,
        )
        return {"objects": plan.rows, "lists": lists.count}


def main() -> None:
    """Generate the inputs, run every scenario side by side, print figures, ratios and goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/capray-scale", help="where inputs and outputs are generated")
    parser.add_argument("--scenario", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--objects", type=int, default=50_000, help="objects of the S3 listing check")
    args = parser.parse_args()
    if args.scenario:
        return scenario(args)
    root = Path(args.dir)
    t0 = time.time()
    make_manifests(root / "manifest-1M", 1_000_000)
    make_manifests(root / "manifest-4M", 4_000_000)
    make_tree(root / "folder-1M", 1000, 1000)
    print(f"inputs ready under {root} ({time.time() - t0:.0f} s)", flush=True)
    for out in ("out-1M", "out-4M", "out-folder", "work"):
        shutil.rmtree(root / out, ignore_errors=True)
    r1 = run_scenario("manifest-1M", root / "manifest-1M", root / "out-1M", root / "work")
    r4 = run_scenario("manifest-4M", root / "manifest-4M", root / "out-4M", root / "work")
    rf = run_scenario("folder-1M", root / "folder-1M", root / "out-folder", root / "work")
    for i, f in enumerate(sorted((root / "out-4M").glob("*.parquet"))):
        if i % 2:
            f.unlink()
    rh = run_scenario("manifest-4M-half", root / "manifest-4M", root / "out-4M", root / "work")
    s3 = s3_listing(args.objects, root / "work-s3")
    goals = [
        ("driver RSS above idle at 1M <= 300 MB", r1["rss_mb"], r1["rss_mb"] <= 300),
        ("driver RSS 4M / 1M <= 1.3", r4["rss_mb"] / r1["rss_mb"], r4["rss_mb"] / r1["rss_mb"] <= 1.3),
        (
            "time to first batch 4M / 1M <= 1.5",
            r4["first_batch_s"] / r1["first_batch_s"],
            r4["first_batch_s"] / r1["first_batch_s"] <= 1.5,
        ),
        (
            "first batch half-done 4M / fresh 4M <= 1",
            rh["first_batch_s"] / r4["first_batch_s"],
            rh["first_batch_s"] <= r4["first_batch_s"],
        ),
        (
            "rows/s (slowest scenario) >= 10,000",
            min(r["rows_per_s"] for r in (r1, r4, rf, rh)),
            min(r["rows_per_s"] for r in (r1, r4, rf, rh)) >= 10_000,
        ),
        (
            "S3 objects per LIST request ~ 1,000 (>= 500)",
            s3["objects"] / s3["lists"],
            s3["objects"] / s3["lists"] >= 500,
        ),
    ]
    print("\ngoal                                              measured   met")
    for name, value, met in goals:
        print(f"{name:48s} {value:10.2f}   {'yes' if met else 'NO'}")
    per_row = (r4["rss_mb"] - r1["rss_mb"]) * 2**20 / 3_000_000
    print(
        f"\nprojection: driver bytes per extra image {per_row:.1f} (1M -> 4M); per shard {per_row * FILE_ROWS:.0f}; "
        f"at 100M images ({100_000_000 // FILE_ROWS:,} shards): +{r1['rss_mb'] + per_row * 99e6 / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    main()
