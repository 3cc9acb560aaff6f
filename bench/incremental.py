"""Incremental re-runs at 1M images: a re-run after 1% new keys scattered through the key order,
against a fresh run of the same folder, side by side; and the audit of a 1M-row output.

A benchmark, not a test: `.venv/bin/python bench/incremental.py` (about 10 minutes on 2 cores;
the 1M-file tree of bench/scale.py is generated under --dir and reused). The model is
bench/scale.py's stand-in (no decoding, one caption per row); each run is a fresh process with its
own local Ray, so driver peak RSS is measured above that process's idle `ray.init` driver.
  fresh    the folder (1,000 folders x 1,000 files) captioned into an empty output
  re-run   10,000 files added (10 per folder, names among the old ones), the same command again:
           a new listing, compared with the old one by Ray tasks, changed shards copy their
           unchanged rows and run only the new images through the model
Goals (issue 24): images through the model in the re-run / new images <= 1.05; re-run driver RSS
<= 1.1 x fresh; re-run time to first batch <= 1.5 x fresh. Then `bench/audit.py`'s 1M-row audit.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit import cpu_model, run_audit_bench
from scale import make_tree, run_scenario

DIRS, PER_DIR, NEW_PER_DIR = 1000, 1000, 10


def add_scattered(tree: Path, seed: int = 0) -> list[Path]:
    """NEW_PER_DIR new empty .jpg files per folder, each named right after a random old one
    (`00412a.jpg` sorts between `00412.jpg` and `00413.jpg`): insertions all over the key order."""
    rng = random.Random(seed)
    added = []
    for d in range(DIRS):
        for i in rng.sample(range(PER_DIR), NEW_PER_DIR):
            path = tree / f"{d:04d}" / f"{i:05d}a.jpg"
            path.touch()
            added.append(path)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", default="/tmp/capray-scale", help="where inputs and outputs are generated (shared with bench/scale.py)"
    )
    parser.add_argument("--audit-rows", type=int, default=1_000_000, help="rows of the audit benchmark (0 = skip)")
    args = parser.parse_args()
    root = Path(args.dir)
    print(f"CPU: {cpu_model()}", flush=True)
    tree = root / "folder-1M"
    make_tree(tree, DIRS, PER_DIR)
    for stale in tree.glob("*/*a.jpg"):  # left by an interrupted run of this benchmark
        stale.unlink()
    out, work = root / "out-incremental", root / "work-incremental"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    extra = [f"inputs.shard_rows={10_000}"]
    fresh = run_scenario("fresh", tree, out, work, extra)
    added = add_scattered(tree)
    try:
        rerun = run_scenario("re-run", tree, out, work, extra)
    finally:
        for path in added:
            path.unlink()
    new = len(added)
    goals = [
        ("images through the model / new images <= 1.05", rerun["computed"] / new, rerun["computed"] / new <= 1.05),
        (
            "re-run driver RSS / fresh <= 1.1",
            rerun["rss_mb"] / fresh["rss_mb"],
            rerun["rss_mb"] <= 1.1 * fresh["rss_mb"],
        ),
        (
            "re-run first batch / fresh <= 1.5",
            rerun["first_batch_s"] / fresh["first_batch_s"],
            rerun["first_batch_s"] <= 1.5 * fresh["first_batch_s"],
        ),
    ]
    print(
        f"\nre-run: {new:,} new images; {rerun['computed']:,} rows through the model, {rerun['copied']:,} copied; "
        f"{rerun['rows']:,} rows written in {rerun['shards'] - rerun['shards_done_before']} of {rerun['shards']} shards"
    )
    print("\ngoal                                              measured   met")
    for name, value, met in goals:
        print(f"{name:48s} {value:10.3f}   {'yes' if met else 'NO'}")
    if args.audit_rows:
        t0 = time.time()
        result = run_audit_bench(args.audit_rows, root / "audit")
        print(f"\naudit of {args.audit_rows:,} rows: {result} ({time.time() - t0:.0f} s with its inputs)")


if __name__ == "__main__":
    main()
