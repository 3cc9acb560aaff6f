"""Benchmark: training throughput with 1 and 2 Ray Train workers on the same data, one run.

Extracts features of N synthetic scenes once, then trains the same config with ray.num_workers=1
and =2 (same global batch, same epochs) and prints captions/s (mean over epochs after the
first, which includes tracing) and wall time per run.

Usage: python bench/scaling.py [--images 960] [--epochs 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Train with 1 and 2 workers and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from capray import extraction, train
    from capray.config import load_config
    from capray.logs import install_cli_handler
    from capray.runtime import init_ray

    install_cli_handler()  # the jobs' `[capray]` lines, as the CLI prints them

    work = tempfile.mkdtemp(prefix="capray-scaling-")
    common = [
        f"work_dir={work}",
        f"data.synthetic_images={args.images}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.num_to_keep=0",
    ]
    init_ray(load_config(REPO / "configs/demo.yaml", common))
    extraction.run(load_config(REPO / "configs/demo.yaml", common))
    results = {}
    for n in (1, 2):
        cfg = load_config(REPO / "configs/demo.yaml", [*common, f"ray.num_workers={n}", f"name=w{n}"])
        start = time.perf_counter()
        best = train.train(cfg)
        wall = time.perf_counter() - start
        states = sorted(
            (json.loads(Path(p).read_text()) for p in glob.glob(f"{work}/runs/w{n}/checkpoint_*/state.json")),
            key=lambda s: s["epoch"],
        )
        rates = [s["metrics"]["captions_per_s"] for s in states[1:]] or [states[0]["metrics"]["captions_per_s"]]
        results[n] = (sum(rates) / len(rates), wall, best["metrics"]["val_loss"])
    print(f"{args.images} scenes (80% train), global batch {args.batch_size}, {args.epochs} epochs, 2 CPUs")
    for n, (rate, wall, val) in results.items():
        print(
            f"{n} worker(s): {rate:7.1f} captions/s (epochs 2+), {wall:6.1f} s wall for train(), best val_loss {val:.4f}"
        )
    print(f"2 workers / 1 worker throughput: {results[2][0] / results[1][0]:.2f}")


if __name__ == "__main__":
    main()
