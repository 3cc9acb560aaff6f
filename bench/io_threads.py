"""Benchmark: reading and decoding images from S3 with `inputs.io_threads` 1, 4 and 8, in one run.

A local S3-protocol server (moto, in this process) holds 2,000 JPEG objects (the shared Flickr
photos, cycled). Each job is the real image pipeline (plan, one actor, its read/decode thread
pool, Parquet writer) with a stand-in model that does nothing, so images/s is what reading and
decoding deliver to a model. First the server's own latency: one GET after another, one client.

  python bench/io_threads.py [--images DIR] [--objects 2000] [--threads 1 4 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from moto_s3 import bench_settings, moto_server

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev" / "images"


class NoModel:
    """A model that costs nothing: one row per image with its decode error, if any."""

    def __call__(self, batch: dict) -> pa.Table:
        return pa.table(
            {"image": list(batch["image"]), "error": pa.array([e or None for e in batch["error"]], pa.string())}
        )


def main() -> None:
    """Upload the objects, time GETs, then one job per thread count; print images/s and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    photos = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no .jpg files in {args.images}: pass --images DIR")

    import ray

    from capray import inputs, pipeline, storage
    from capray.config import load_config
    from capray.runtime import init_ray

    with moto_server(lambda line: "GET" in line) as (endpoint, _gets), tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*bench_settings(endpoint), f"work_dir={tmp}/work"])
        uris = [f"s3://bench/photos/{i:05d}.jpg" for i in range(args.objects)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(lambda i: storage.write_bytes(uris[i], photos[i % len(photos)], cfg.storage), range(len(uris)))
            )
        size = sum(len(photos[i % len(photos)]) for i in range(len(uris))) / len(uris)
        start = time.perf_counter()
        for uri in uris[:200]:
            storage.read_bytes(uri, cfg.storage)
        latency = (time.perf_counter() - start) / 200 * 1000

        init_ray(load_config(None, ["ray.local_cpus=2"]))
        ray.data.DataContext.get_current().enable_progress_bars = False
        schema = pa.schema([("image", pa.string()), ("error", pa.string())])
        results = {}
        for n in [args.threads[0], *args.threads]:  # the first run also warms Ray Data up; not kept
            job = load_config(
                None,
                [
                    *bench_settings(endpoint),
                    f"work_dir={tmp}/work-{n}",
                    f"inputs.io_threads={n}",
                    "inputs.shard_rows=200",
                    "caption.min_actors=1",
                    "caption.max_actors=1",
                    "caption.batch_size=16",
                ],
            )
            plan = inputs.plan(job, "s3://bench/photos/", f"{tmp}/work-{n}/inputs")
            out = f"{tmp}/out-{n}-{time.time_ns()}"
            s = pipeline.run(job, plan, out, NoModel, {}, job.caption, schema, f"io_threads={n}")
            assert s["written"] == len(uris) and s["failed"] == 0, s
            # The actor's own time on its shards (reading, decoding, writing), without the job's start-up.
            results[n] = len(uris) / (s["model_s"] + s["wait_s"])
            results[f"{n} job"] = s["images_per_s"]
        ray.shutdown()

    print(
        f"{args.objects} JPEG objects ({size / 1024:.0f} KiB on average) on a local moto S3 server; "
        f"one GET after another: {latency:.1f} ms each"
    )
    print(f"{'io_threads':>10s} {'images/s (actor)':>17s} {'images/s (job)':>15s}")
    for n in args.threads:
        print(f"{n:10d} {results[n]:17.1f} {results[f'{n} job']:15.1f}")
    lo, hi = min(args.threads), max(args.threads)
    print(
        f"io_threads {hi} / io_threads {lo} = {results[hi] / results[lo]:.2f}x (actor), "
        f"{results[f'{hi} job'] / results[f'{lo} job']:.2f}x (job, with its start-up)"
    )


if __name__ == "__main__":
    main()
