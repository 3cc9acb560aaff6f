"""Benchmark: the features files' Parquet codec (`extract.compression`): bytes, write and read cost;
and the cast to float16 in the compiled forward vs after it in NumPy.

Features of real photos (InceptionV3 with `backbone.weights=random`, float16 as stored, computed in
float32 and in bfloat16) are written as the extraction job writes them (`FeatureExtractor.rows`,
one file of one row group) with each codec, then read back; best of 3 per figure, one thread.

Usage: python bench/feature_codec.py [--images DIR] [--limit 128]
Default images: ../shared/data/flickr8k-dev/images. ImageNet weights make sparser features (more
zeros after the ReLU) than random ones: the sizes here are for random weights.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import capray  # noqa: F401  (sets the Keras backend before TensorFlow is imported)

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev" / "images"
CODECS = ("none", "snappy", "lz4", "zstd")


def feature_table(paths: list[str], precision: str) -> pa.Table:
    """The job's feature rows (float16) for `paths`, computed under `precision`."""
    from capray.extraction import FeatureExtractor
    from capray.images import decode
    from capray.model import set_precision

    model = FeatureExtractor("random", seed=0, precision=precision)
    try:
        pixels = np.stack([decode(Path(p).read_bytes(), 64_000_000) for p in paths])
        tables = [
            model.rows(paths[i : i + 16], pixels[i : i + 16], [""] * len(pixels[i : i + 16]))
            for i in range(0, len(paths), 16)
        ]
    finally:
        set_precision("float32")
    return pa.concat_tables(tables)


def cast_cost(paths: list[str], precision: str = "mixed_bfloat16", rounds: int = 3) -> tuple[float, float]:
    """ms/image of InceptionV3 with the float16 cast in the graph, and with float32 output cast
    by NumPy afterwards (as before), batch 16, interleaved batch by batch."""
    from capray.images import decode
    from capray.model import Backbone, set_precision

    set_precision(precision)
    try:
        pixels = np.stack([decode(Path(p).read_bytes(), 64_000_000) for p in paths])
        in_graph, numpy_cast = Backbone("random", 0, dtype="float16"), Backbone("random", 0)
        in_graph(pixels[:16]), numpy_cast(pixels[:16])  # traced once each
        a = b = 0.0
        for _ in range(rounds):
            for i in range(0, len(pixels), 16):
                a += best_of(1, lambda: in_graph(pixels[i : i + 16]))
                b += best_of(1, lambda: numpy_cast(pixels[i : i + 16]).astype(np.float16))
    finally:
        set_precision("float32")
    n = rounds * len(pixels)
    return a / n * 1e3, b / n * 1e3


def best_of(n: int, fn) -> float:
    """The fastest of `n` calls of `fn`, in seconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Write and read the same feature rows with each codec; print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--limit", type=int, default=128)
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.images, "*.jpg")))[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")
    pa.set_cpu_count(1)
    with tempfile.TemporaryDirectory(prefix="capray-codec-") as tmp:
        print(f"{len(paths)} photos from {args.images}; float16 features (64 x 2048, 256 KiB raw per image)")
        print(f"{'computed in':15s} {'codec':7s} {'KiB/image':>10s} {'write ms/image':>15s} {'read ms/image':>14s}")
        for precision in ("float32", "mixed_bfloat16"):
            table = feature_table(paths, precision)
            for codec in CODECS:
                out = os.path.join(tmp, f"{precision}-{codec}.parquet")

                def write() -> None:
                    with pq.ParquetWriter(out, table.schema, compression=codec) as w:
                        w.write_table(table)

                w = best_of(3, write)
                r = best_of(3, lambda: pq.read_table(out, use_threads=False))
                n = table.num_rows
                print(
                    f"{precision:15s} {codec:7s} {os.path.getsize(out) / n / 1024:10.0f} {w / n * 1e3:15.2f} {r / n * 1e3:14.2f}"
                )
    graph_ms, numpy_ms = cast_cost(paths[:64])
    print(
        f"InceptionV3 (mixed_bfloat16, batch 16, 64 photos x 3): float16 cast in the graph {graph_ms:.2f} ms/image, "
        f"float32 output + NumPy cast {numpy_ms:.2f} ms/image"
    )


if __name__ == "__main__":
    main()
