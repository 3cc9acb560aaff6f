"""Benchmark: feature extraction throughput, three ways, in float32 and bfloat16, in one run.

  (a) bound     compiled InceptionV3 forward on already decoded, resized batches, in a Ray worker
                like the job's actor (before and after the jobs: their mean)
  (b) job       `capray.extraction.extract` end to end: read, decode, resize, forward, write Parquet,
                on the images once (1x) and each under 4 names (4x); the pair separates the
                job's fixed start-up from its steady-state rate: (N4 - N1) / (t4 - t1)
  (c) tutorial  the TF tutorial's loop: one image at a time, eager, one .npy file per image

(a) and (b) run under model.precision float32 and mixed_bfloat16 (bfloat16 compute pays off on
CPUs with AVX512-BF16 or AMX); (c) in float32.

Usage: python bench/extract.py [--images DIR] [--limit N] [--batch-size B] [--tutorial-limit N]
Default images: ../shared/data/flickr8k-dev/images (real JPEGs). Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import capray  # noqa: F401  (sets the Keras backend before TensorFlow is imported)

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev" / "images"


def dir_bytes(path: str) -> int:
    """Total size of the files under `path`."""
    return sum(
        os.path.getsize(p) for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p)
    )


def forward_rate(paths: list[str], batch_size: int, precision: str = "float32") -> float:
    """Images/s of the compiled forward alone on pre-decoded batches, in this process."""
    from capray.images import decode
    from capray.model import Backbone, set_precision

    set_precision(precision)
    try:
        backbone = Backbone("random", seed=0)
        pixels = np.stack([decode(Path(p).read_bytes(), 64_000_000) for p in paths])
        backbone(pixels[:batch_size])  # trace once, as the job's actors do before their first batch
        start = time.perf_counter()
        for i in range(0, len(pixels), batch_size):
            backbone(pixels[i : i + batch_size])
        return len(pixels) / (time.perf_counter() - start)
    finally:
        set_precision("float32")


def bound(paths: list[str], batch_size: int, precision: str = "float32") -> float:
    """(a): `forward_rate` in a Ray worker with one CPU reserved, as the job's actor has: the same
    process environment (Ray sets OMP_NUM_THREADS in its workers), only reading, decoding and
    writing taken away."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(forward_rate).remote(paths, batch_size, precision))


def job(
    paths: list[str], batch_size: int, out: str, precision: str = "float32", extra: list[str] = ()
) -> tuple[float, float, int, float]:
    """(b): seconds and images/s of the extraction job (Ray already running), bytes written, and the
    share of the model's time spent waiting for decoded images."""
    from capray import extraction
    from capray.config import load_config

    cfg = load_config(
        None,
        [
            "backbone.weights=random",
            f"extract.batch_size={batch_size}",
            f"work_dir={out}.work",
            f"model.precision={precision}",
            *extra,
        ],
    )
    start = time.perf_counter()
    summary = extraction.extract(cfg, paths, out)
    seconds = time.perf_counter() - start
    assert summary["extracted"] == len(paths), summary
    return seconds, len(paths) / seconds, dir_bytes(out), summary["wait_share"]


def tutorial(paths: list[str], out: str) -> float:
    """(c): the tutorial's per-image eager loop (load_image + image_features_extract_model + np.save)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    base = keras.applications.InceptionV3(include_top=False, weights=None)
    model = keras.Model(base.input, base.layers[-1].output)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for p in paths:
        img = tf.io.decode_jpeg(tf.io.read_file(p), channels=3)
        img = tf.image.resize(img, (299, 299))
        img = keras.applications.inception_v3.preprocess_input(img)
        feats = model(img[None])  # eager, batch of one
        feats = tf.reshape(feats, (feats.shape[0], -1, feats.shape[3]))
        np.save(os.path.join(out, Path(p).name + ".npy"), feats[0].numpy())
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    """Run (a), (b), (c) on the same images and print the figures and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--limit", type=int, default=0, help="use the first N images (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tutorial-limit", type=int, default=100, help="images for (c), the slow loop (0: skip it)")
    ap.add_argument(
        "--repeat", type=int, default=4, help="the larger job presents each image N times under different names"
    )
    ap.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for the jobs, e.g. inputs.io_threads=2")
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.images, "*.jpg")))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")
    tmp = tempfile.mkdtemp(prefix="capray-bench-")
    # Symlinks under new names: a larger job on the same pixels, to separate start-up cost
    # (actor start, TensorFlow import, model build, tracing) from steady-state throughput.
    os.makedirs(os.path.join(tmp, "in"))
    many = []
    for r in range(args.repeat):
        for p in paths:
            many.append(os.path.join(tmp, "in", f"r{r}_{Path(p).name}"))
            os.symlink(p, many[-1])

    import ray

    from capray.config import load_config
    from capray.logs import install_cli_handler
    from capray.runtime import init_ray

    install_cli_handler()  # the jobs' `[capray]` lines, as the CLI prints them
    init_ray(load_config(None, []))
    rows = {}
    try:
        # An untimed warm-up job: the first Ray Data job of a fresh Ray instance also starts
        # Ray Data's own session actors, which a cluster that has run a job already has.
        job(paths[: args.batch_size], args.batch_size, os.path.join(tmp, "warm"))
        for precision in args.precisions:
            # The bound before and after the jobs: this machine's speed drifts by ~10% between
            # minutes, so the jobs are compared with the mean of the two (both are printed).
            before = bound(paths, args.batch_size, precision)
            t1, b1, nbytes, _wait1 = job(
                paths, args.batch_size, os.path.join(tmp, f"f1-{precision}"), precision, args.set
            )
            t4, b4, _, wait4 = job(many, args.batch_size, os.path.join(tmp, f"f4-{precision}"), precision, args.set)
            after = bound(paths, args.batch_size, precision)
            steady = (len(many) - len(paths)) / (t4 - t1)
            rows[precision] = ((before + after) / 2, b1, b4, steady, wait4, nbytes, before, after)
        if args.tutorial_limit:
            c = tutorial(paths[: args.tutorial_limit], os.path.join(tmp, "npy"))
            npy_bytes = dir_bytes(os.path.join(tmp, "npy")) / min(len(paths), args.tutorial_limit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    from capray.config import cpu_bf16

    print(
        f"images: {len(paths)} (and {len(many)} = {args.repeat} x each) from {args.images}; batch size {args.batch_size}; "
        f"{os.cpu_count()} CPUs ({cpu_bf16() or 'no BF16 instructions'}), no GPU; {' '.join(args.set) or 'default config'}"
    )
    print(
        f"{'precision':15s} {'(a) bound':>10s} {'(b) job 1x':>11s} {'(b) job 4x':>11s} {'steady':>8s} {'steady/(a)':>11s} {'model waits':>12s}"
    )
    for precision, (a, b1, b4, steady, wait, *_) in rows.items():
        print(f"{precision:15s} {a:10.1f} {b1:11.1f} {b4:11.1f} {steady:8.1f} {steady / a:11.2f} {wait:12.0%}")
    print("(images/s; (a) = the mean of the bound measured before and after the jobs; steady = the 4x job's")
    print(" extra images over its extra seconds; model waits = share of the actors' model time spent waiting")
    print(" for decoded images, 4x job)")
    for precision, (*_, nbytes, before, after) in rows.items():
        print(
            f"{precision}: bound before the jobs {before:.1f}, after {after:.1f} images/s; "
            f"(b) writes {nbytes / len(paths) / 1024:.0f} KiB per image"
        )
    f32 = rows.get("float32")
    if f32 and args.tutorial_limit:
        print(
            f"(c) tutorial-style loop  {c:7.1f} images/s  ({npy_bytes / 1024:.0f} KiB per image, one float32 .npy each; "
            f"{min(len(paths), args.tutorial_limit)} images); (b) writes {f32[5] / len(paths) / 1024:.0f} KiB per image"
        )
        print(
            f"float32: (b) 1x / (a) = {f32[1] / f32[0]:.2f} (goal >= 0.85); (b) 1x / (c) = {f32[1] / c:.1f} (goal >= 8)"
        )
    if "float32" in rows and "mixed_bfloat16" in rows:
        print(f"bfloat16 bound / float32 bound = {rows['mixed_bfloat16'][0] / rows['float32'][0]:.2f} (goal >= 1.5)")
    for precision, (a, _, _, steady, *_) in rows.items():
        print(f"{precision}: steady state / its own bound = {steady / a:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
