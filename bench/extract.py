"""Benchmark: feature extraction throughput, three ways, side by side in one run.

  (a) bound     compiled InceptionV3 forward on already decoded, resized batches
  (b) job       `capray.features.extract` end to end: read, decode, resize, forward, write Parquet
  (c) tutorial  the TF tutorial's loop: one image at a time, eager, one .npy file per image

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
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))


def bound(paths: list[str], batch_size: int) -> float:
    """(a): images/s of the compiled forward alone on pre-decoded batches."""
    from capray.images import decode
    from capray.model import ImageEncoder

    encoder = ImageEncoder("random", seed=0)
    pixels = np.stack([decode(Path(p).read_bytes(), 64_000_000) for p in paths])
    encoder(pixels[:batch_size])  # trace once, as the job's actors do before their first batch
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def job(paths: list[str], batch_size: int, out: str) -> tuple[float, int]:
    """(b): images/s of the extraction job (Ray already running), and bytes written."""
    from capray import features
    from capray.config import load_config

    cfg = load_config(None, ["encoder.weights=random", f"extract.batch_size={batch_size}", f"work_dir={out}.work"])
    start = time.perf_counter()
    summary = features.extract(cfg, paths, out)
    seconds = time.perf_counter() - start
    assert summary["extracted"] == len(paths), summary
    return len(paths) / seconds, dir_bytes(out)


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
    ap.add_argument("--tutorial-limit", type=int, default=100, help="images for (c), the slow loop")
    ap.add_argument("--repeat", type=int, default=1, help="present each image N times under different names")
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.images, "*.jpg")))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")
    tmp = tempfile.mkdtemp(prefix="capray-bench-")
    if args.repeat > 1:
        # Symlinks under new names: a larger job on the same pixels, to separate start-up cost
        # (actor start, TensorFlow import, model build, tracing) from steady-state throughput.
        os.makedirs(os.path.join(tmp, "in"))
        links = []
        for r in range(args.repeat):
            for p in paths:
                links.append(os.path.join(tmp, "in", f"r{r}_{Path(p).name}"))
                os.symlink(p, links[-1])
        paths = links

    import ray

    from capray.config import load_config
    from capray.runtime import init_ray

    init_ray(load_config(None, []))
    try:
        b, nbytes = job(paths, args.batch_size, os.path.join(tmp, "features"))
        a = bound(paths, args.batch_size)
        c = tutorial(paths[: args.tutorial_limit], os.path.join(tmp, "npy"))
        npy_bytes = dir_bytes(os.path.join(tmp, "npy")) / min(len(paths), args.tutorial_limit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    print(f"images: {len(paths)} ({args.repeat} x each) from {args.images}; batch size {args.batch_size}; {os.cpu_count()} CPUs, no GPU")
    print(f"(a) forward bound        {a:7.1f} images/s")
    print(f"(b) extraction job       {b:7.1f} images/s  ({nbytes / len(paths) / 1024:.0f} KiB written per image, float16 Parquet)")
    print(f"(c) tutorial-style loop  {c:7.1f} images/s  ({npy_bytes / 1024:.0f} KiB per image, one float32 .npy each; {min(len(paths), args.tutorial_limit)} images)")
    print(f"(b)/(a) = {b / a:.2f}   (goal >= 0.85)")
    print(f"(b)/(c) = {b / c:.1f}   (goal >= 8)")


if __name__ == "__main__":
    main()
