"""Benchmark: how long training workers wait for their input, streamed every epoch vs cached, in one run.

Runs the training job twice on the same extracted features (the demo's, by default), as users
run it (`capray train`, 2 Ray Train workers on local Ray):

  stream  train.cache_mb=0: every epoch re-reads the feature files, filters them to the split
          and pairs each caption with its image's features through Ray Data (as before issue 15)
  cache   the default: the first epoch streams and each worker keeps its rows in memory
          (float16, within train.cache_mb); later epochs shuffle and batch from memory

and prints, per epoch, captions/s and the share of the training wall time the workers waited
for their next batch (the job's own measurement, printed in its epoch lines).

  python bench/train_input.py [--work-dir outputs/demo] [--epochs 4] [key=value ...]

The work dir must hold extracted features and a split (run `make demo` first). Extra key=value
arguments go to both runs (e.g. model.precision=mixed_bfloat16).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCH = re.compile(
    r"epoch (\d+)/\d+ step \d+ train_loss \S+ val_loss \S+ \((\d+) captions/s, (\d+)% of it waiting for input\)"
)


def run(work: Path, name: str, epochs: int, extra: list[str]) -> tuple[list[tuple[int, int, int]], float]:
    """One training job; its (epoch, captions/s, wait %) lines and wall seconds."""
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "capray.cli",
        "train",
        str(REPO / "configs/demo.yaml"),
        f"work_dir={work}",
        f"name={name}",
        f"train.epochs={epochs}",
        "evaluate.after_train=false",
        *extra,
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return [tuple(map(int, m.groups())) for m in EPOCH.finditer(out.stdout + out.stderr)], seconds


def main() -> None:
    """Both runs, then the table and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "demo")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not (args.work_dir / "features" / "_files.json").is_file():
        raise SystemExit(f"no extracted features in {args.work_dir}: run `make demo` first or pass --work-dir")
    results = {}
    for label, extra in (("stream", ["train.cache_mb=0"]), ("cache", [])):
        results[label] = run(args.work_dir.resolve(), f"bench-input-{label}", args.epochs, [*extra, *args.overrides])
    print(f"training on {args.work_dir}, {args.epochs} epochs, 2 workers; {' '.join(args.overrides) or 'float32'}")
    print(f"{'epoch':>5s} {'stream captions/s':>18s} {'waiting':>8s} {'cache captions/s':>17s} {'waiting':>8s}")
    for (e, r1, w1), (_, r2, w2) in zip(results["stream"][0], results["cache"][0]):
        print(f"{e:5d} {r1:18d} {w1:7d}% {r2:17d} {w2:7d}%")
    for label, (epochs, seconds) in results.items():
        later = epochs[1:]
        wait = sum(w for _, _, w in later) / max(len(later), 1)
        rate = sum(r for _, r, _ in later) / max(len(later), 1)
        print(
            f"{label:6s}: wall {seconds:6.1f} s; epochs 2-{len(epochs)}: {rate:.0f} captions/s, {wait:.0f}% of the time waiting for input"
        )
    s, c = results["stream"][0][1:], results["cache"][0][1:]
    if s and c:
        print(f"cache / stream, captions/s in epochs 2+: {sum(r for _, r, _ in c) / sum(r for _, r, _ in s):.2f}x")


if __name__ == "__main__":
    main()
