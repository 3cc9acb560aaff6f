"""Benchmark: the bulk caption job end to end, against the InceptionV3 forward bound, in one run.

  bound   compiled InceptionV3 forward on already decoded, resized batches; and the caption job's
          own bound: the whole model (InceptionV3 + greedy decoding, `CaptionPredictor`) on them
  greedy  `capray.captioning.caption`: JPEG files -> decode -> features -> greedy -> Parquet rows
  beam    the same with beam search of 3
  memory  peak RSS of all Ray processes (the driver and every process it started) while
          captioning 1x and 4x the images (the 4x set is each image under 4 names)
  steady  the 1x and 4x greedy jobs split into a fixed start-up per job and a steady-state
          rate: rate = (N4 - N1) / (t4 - t1), start-up = t1 - N1 / rate
  bf16    bound, greedy 1x and 4x again under model.precision=mixed_bfloat16 (pays off on CPUs
          with AVX512-BF16 or AMX)

A 16-image job runs first, untimed: the first Ray Data job of a fresh Ray instance also creates
Ray Data's detached session actors (stats, autoscaling), which a cluster that has run any job
already has. Its wall time is printed.

Usage: python bench/caption.py [--checkpoint DIR] [--images DIR] [--batch-size 16]
Default checkpoint: outputs/demo/runs/demo/best (run `make demo` first).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import capray  # noqa: F401  (sets the Keras backend)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "flickr8k-dev" / "images"


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's processes)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        me = os.getpid()
        while not self._stop.is_set():
            # Linux /proc: parent and resident pages of every process; sum over our process tree.
            parent, rss = {}, {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(entry)], rss[int(entry)] = int(fields[1]), int(fields[21]) * page
            tree, frontier = {me}, [me]
            while frontier:
                kids = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
                tree.update(kids)
                frontier = kids
            self.peak = max(self.peak, sum(rss.get(pid, 0) for pid in tree))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def linked(paths: list[str], copies: int, folder: str) -> str:
    """A folder holding each image `copies` times under different names (symlinks)."""
    os.makedirs(folder)
    for c in range(copies):
        for p in paths:
            os.symlink(p, os.path.join(folder, f"c{c}_{Path(p).name}"))
    return folder


def parse_args(
    doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """The caption benchmarks' command line (--checkpoint, --images, --batch-size, and what `extra`
    adds) and the JPEGs."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "outputs/demo/runs/demo/best"))
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--batch-size", type=int, default=16)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run `make demo` or pass --checkpoint")
    return args, sorted(glob.glob(os.path.join(args.images, "*.jpg")))


def main() -> None:
    """Measure bound, greedy, beam and memory; print figures and ratios."""
    args, paths = parse_args(__doc__)

    from capray.captioning import CaptionPredictor, caption
    from capray.config import load_config
    from capray.images import decode
    from capray.logs import install_cli_handler
    from capray.model import Backbone, set_precision
    from capray.runtime import init_ray

    install_cli_handler()  # the jobs' `[capray]` lines, as the CLI prints them
    init_ray(load_config(None, []))
    tmp = tempfile.mkdtemp(prefix="capray-bench-")
    base = [f"caption.batch_size={args.batch_size}", f"work_dir={tmp}"]
    try:
        one = linked(paths, 1, os.path.join(tmp, "x1"))
        four = linked(paths, 4, os.path.join(tmp, "x4"))
        warm = linked(paths[: args.batch_size], 1, os.path.join(tmp, "warm"))
        start = time.perf_counter()
        caption(load_config(None, base), args.checkpoint, warm, os.path.join(tmp, "warm_out"))
        warmup = time.perf_counter() - start
        results = {}
        bf16 = ["model.precision=mixed_bfloat16"]
        for name, folder, extra in (
            ("greedy", one, []),
            ("beam3", one, ["caption.strategy=beam", "caption.beam_size=3"]),
            ("greedy x4", four, []),
            ("bf16", one, bf16),
            ("bf16 x4", four, bf16),
        ):
            cfg = load_config(None, [*base, *extra])
            with PeakRSS() as mem:
                start = time.perf_counter()
                summary = caption(cfg, args.checkpoint, folder, os.path.join(tmp, name.replace(" ", "_")))
                seconds = time.perf_counter() - start
            assert summary["written"] == len(os.listdir(folder)), summary
            results[name] = (summary["written"], seconds, mem.peak, summary["wait_share"])

        pixels = np.stack([decode(Path(p).read_bytes(), 64_000_000) for p in paths])
        bounds, model_bounds = {}, {}
        for precision in ("float32", "mixed_bfloat16"):
            set_precision(precision)
            backbone = Backbone("random")  # the forward cost does not depend on the weights
            backbone(pixels[: args.batch_size])
            start = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                backbone(pixels[i : i + args.batch_size])
            bounds[precision] = len(pixels) / (time.perf_counter() - start)
            cfg = load_config(None, [*base, f"model.precision={precision}"])
            predictor = CaptionPredictor(**CaptionPredictor.arguments(cfg, args.checkpoint))
            predictor.caption_pixels(pixels[: args.batch_size])
            start = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                predictor.caption_pixels(pixels[i : i + args.batch_size])
            model_bounds[precision] = len(pixels) / (time.perf_counter() - start)
        set_precision("float32")
        bound = bounds["float32"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{len(paths)} images from {args.images}; batch {args.batch_size}; checkpoint {args.checkpoint}")
    print(f"forward bound            {bound:6.1f} images/s")
    print(f"warm-up job ({args.batch_size} images, first Ray Data job of this Ray instance): {warmup:.1f} s")
    print(
        f"forward bound, bfloat16  {bounds['mixed_bfloat16']:6.1f} images/s "
        f"({bounds['mixed_bfloat16'] / bound:.2f}x float32; goal >= 1.5)"
    )
    print(
        f"whole-model bound (InceptionV3 + greedy, pre-decoded pixels): float32 {model_bounds['float32']:.1f}, "
        f"bfloat16 {model_bounds['mixed_bfloat16']:.1f} images/s"
    )
    for name, (n, seconds, peak, wait) in results.items():
        print(
            f"{name:10s} {n:5d} images {seconds:6.1f} s  {n / seconds:6.1f} images/s  peak RSS {peak / 2**30:5.2f} GiB  "
            f"model waited {wait:.0%}"
        )
    h, h4 = results["bf16"], results["bf16 x4"]
    rate16 = (h4[0] - h[0]) / (h4[1] - h[1])
    print(
        f"bfloat16 steady state {rate16:6.1f} images/s, start-up {h[1] - h[0] / rate16:.1f} s per job; "
        f"steady / forward bound = {rate16 / bounds['mixed_bfloat16']:.2f}, "
        f"steady / whole-model bound = {rate16 / model_bounds['mixed_bfloat16']:.2f} (goal >= 0.9)"
    )
    g, b, g4 = results["greedy"], results["beam3"], results["greedy x4"]
    rate = (g4[0] - g[0]) / (g4[1] - g[1])
    print(f"steady state {rate:6.1f} images/s, start-up {g[1] - g[0] / rate:.1f} s per job")
    print(
        f"greedy / bound = {g[0] / g[1] / bound:.2f} ({g[0]} images), {g4[0] / g4[1] / bound:.2f} ({g4[0]} images), "
        f"steady state {rate / bound:.2f}; steady / whole-model bound = {rate / model_bounds['float32']:.2f} (goal >= 0.9)"
    )
    print(f"beam3 wall / greedy wall = {b[1] / g[1]:.2f} (goal <= 1.25)")
    print(f"peak RSS 4x / 1x = {g4[2] / g[2]:.2f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
