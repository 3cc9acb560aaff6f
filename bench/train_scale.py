"""The training driver at 10^5 and 10^6 captions: its memory and the bytes shipped to tasks while
training is prepared (split, vocabulary, datasets, feature statistics: `capray.train.job` up to
the point where the `TensorflowTrainer` would start), this checkout's code against an earlier
revision's, side by side in one run.

A benchmark, not a test: `.venv/bin/python bench/train_scale.py [--before main] [--captions 100000 1000000]
[--repeat N]` (inputs generated once under --dir). The captions are a stand-in table (`data.format=table`,
Parquet; 5 captions per image, 6-14 words each from a Zipf-distributed 20,000-word vocabulary);
the features are stand-ins too: 256 images with features (float16 rows of the real size) in 4
files, so the feature reads stay small and what is measured is the control plane. `--before REV`
runs the same measurement on REV's `capray` (`git archive REV`, put first on PYTHONPATH for the
driver and its Ray workers).

Each (code, captions) scenario runs in its own process with its own local Ray (`ray.local_cpus=2`).
Driver RSS: the peak, sampled every 50 ms, above the process's RSS once Ray is started, the job
module imported and a tiny Ray Data pipeline run (its modules loaded; `--cold` skips it), as
bench/scale.py's `PeakRSS`. Shipped bytes: the pickled size
(`ray.cloudpickle.dumps`) of every function given to `Dataset.map_batches` / `filter` / `map` /
`flat_map` with its bound arguments, and of the arguments of every Ray task submitted, recorded
as the preparation calls them; "largest" is what the biggest one sends with each task it runs.
Goals (issue 26): driver RSS 10^6 / 10^5 <= 1.3; shipped bytes flat.

The RSS growth is about 10 MB on a process of about 750 MB, so one run's ratio moves by more
than the changes measured: `--repeat N` runs every scenario N times, interleaved (each round runs
every code and size once), and compares the medians.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import cpu_model
from scale import PeakRSS

REPO = Path(__file__).resolve().parents[1]
PER_IMAGE = 5
FEATURE_IMAGES = 256


def image_name(i: int) -> str:
    return f"s3://bucket/images/{i:09d}.jpg"


def make_captions(path: Path, captions: int) -> None:
    """`captions` stand-in captions, PER_IMAGE per image, as a Parquet captions table."""
    if path.exists():
        return
    rng = np.random.default_rng(0)
    words = np.array([f"w{k}" for k in range(20_000)], dtype=object)
    lengths = rng.integers(6, 15, captions)
    ids = (rng.zipf(1.2, int(lengths.sum())) - 1) % len(words)
    tokens = words[ids]
    ends = np.cumsum(lengths)
    texts = [" ".join(tokens[e - n : e]) for e, n in zip(ends, lengths)]
    images = [image_name(i // PER_IMAGE) for i in range(captions)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"image": images, "caption": texts}), tmp)
    tmp.rename(path)


def make_features(folder: Path) -> None:
    """FEATURE_IMAGES stand-in feature rows (zeros of the real size) in 4 files, as extraction lays them out."""
    if (folder / "_done").exists():
        return
    from capray.featurestore import FEATURE_SHAPE, SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    blob = np.zeros(FEATURE_SHAPE, np.float16).tobytes()
    per_file = FEATURE_IMAGES // 4
    for k in range(4):
        names = [image_name(i) for i in range(k * per_file, (k + 1) * per_file)]
        n = len(names)
        table = pa.table(
            {
                "image": names,
                "features": [blob] * n,
                "dtype": ["float16"] * n,
                "shape": [list(FEATURE_SHAPE)] * n,
                "error": pa.nulls(n, pa.string()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"part-{k:05d}.parquet")
    (folder / "_done").write_text("")


class Shipped:
    """Records what each Ray Data transform and each of capray's Ray tasks sends with its tasks;
    sized (pickled) only when asked, after the memory measurement."""

    def __init__(self) -> None:
        from ray.data import Dataset
        from ray.remote_function import RemoteFunction

        self.sent: list[tuple[str, tuple]] = []

        def name(fn: object) -> str:
            inner = getattr(fn, "func", fn)
            return getattr(inner, "__qualname__", type(inner).__name__)

        for method in ("map_batches", "filter", "map", "flat_map"):
            original = getattr(Dataset, method)

            def wrapped(ds, fn=None, *args, _original=original, _method=method, **kwargs):
                if fn is None:
                    return _original(ds, *args, **kwargs)
                extra = tuple(kwargs.get(k) for k in ("fn_args", "fn_kwargs", "fn_constructor_args"))
                self.sent.append((f"{_method}({name(fn)})", (fn, *extra)))
                return _original(ds, fn, *args, **kwargs)

            setattr(Dataset, method, wrapped)

        original_remote = RemoteFunction._remote

        def remote(fn, args=None, kwargs=None, **options):
            # capray's own tasks; Ray Data's internal tasks carry the transforms recorded above.
            if fn._function.__module__.startswith("capray"):
                self.sent.append((f"task({fn._function.__qualname__})", (args or (), kwargs or {})))
            return original_remote(fn, args=args, kwargs=kwargs, **options)

        RemoteFunction._remote = remote

    def sizes(self) -> list[tuple[str, int]]:
        from ray import cloudpickle

        return [(label, sum(len(cloudpickle.dumps(o)) for o in objs if o is not None)) for label, objs in self.sent]


def scenario(args: argparse.Namespace) -> None:
    """Prepare training once in this process (a fresh work dir) and print one JSON line."""
    import ray

    import capray
    from capray.config import load_config
    from capray.featurestore import read_features
    from capray.runtime import init_ray
    from capray.train import job

    cfg = load_config(
        None,
        [
            f"work_dir={args.work}",
            "data.format=table",
            f"data.annotations={args.captions}",
            "data.num_examples=0",
            "model.feature_norm=channel",
            "ray.local_cpus=2",
        ],
    )
    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    os.symlink(args.features, Path(args.work) / "features", target_is_directory=True)
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.warm:
        # Ray Data's first pipelines load its modules into the driver (~15 MB, whatever the
        # data): run before the baseline, so that the figure is the preparation's own.
        warm = ray.data.from_items([{"k": i % 3, "v": i} for i in range(30)], override_num_blocks=3)
        warm.map_batches(lambda b: b).groupby("k", num_partitions=2).sum("v").take_all()
    shipped = Shipped()
    time.sleep(2)  # let the driver settle after ray.init before the idle baseline
    rss = PeakRSS()
    t0 = time.time()
    split = job.prepare_split(cfg)
    if "split_uri" in inspect.signature(job.prepare_tokenizer).parameters:
        tokenizer = job.prepare_tokenizer(cfg, split)
        data, loop_config = job.build_datasets(cfg, read_features(f"{args.work}/features"), split, tokenizer)
    else:  # the driver-side path: the split as two DataFrames
        train_df, val_df = split
        tokenizer = job.prepare_tokenizer(cfg, list(train_df["caption"]))
        data, loop_config = job.build_datasets(cfg, read_features(f"{args.work}/features"), train_df, val_df, tokenizer)
    seconds = time.time() - t0
    rss_mb = rss.stop()
    # Not measured: one pass over both datasets, to check they hold what training would read.
    rows = {side: ds.count() for side, ds in data.items()}
    print(
        json.dumps(
            {
                "code": str(Path(capray.__file__).parent),
                "rss_mb": rss_mb,
                "idle_mb": rss.idle / 2**20,
                "seconds": seconds,
                "shipped": shipped.sizes(),
                "train_captions": loop_config["train_captions"],
                "vocab": tokenizer.vocab_size,
                "max_length": tokenizer.max_length,
                "rows": rows,
            }
        )
    )


def run(label: str, code: Path | None, captions: Path, features: Path, work: Path, warm: bool) -> dict:
    """One scenario in a fresh process with `code` (a capray checkout) first on PYTHONPATH."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--scenario", "--captions-file", str(captions), "--features", str(features)]
    cmd += [] if warm else ["--cold"]
    done = subprocess.run([*cmd, "--work", str(work)], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{label} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    largest = max(result["shipped"], key=lambda s: s[1])
    print(
        f"{label:28s} driver +{result['rss_mb']:7.1f} MB (idle {result['idle_mb']:.0f} MB)  {result['seconds']:6.1f} s  "
        f"shipped: {len(result['shipped'])} functions/tasks, {sum(s for _, s in result['shipped']):>11,} bytes in all, "
        f"largest {largest[1]:>11,} ({largest[0]})  train captions {result['train_captions']:,}  "
        f"vocab {result['vocab']}  rows {result['rows']}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--before", default="main", help="revision whose capray is measured too ('' = none)")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "capray-train-scale"))
    parser.add_argument("--cold", dest="warm", action="store_false", help="no Ray Data warm-up before the baseline")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every scenario, interleaved; medians compared")
    parser.add_argument("--scenario", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--captions-file", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        args.captions = args.captions_file
        scenario(args)
        return
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; Ray Data warmed up before the baseline: {args.warm}", flush=True
    )
    root = Path(args.dir)
    features = root / "features"
    make_features(features)
    codes: list[tuple[str, Path | None]] = []
    if args.before:
        old = root / f"code-{args.before}"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.before, "capray"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.before], capture_output=True, text=True
        )
        codes.append((f"before ({args.before} {rev.stdout.strip()})", old))
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    codes.append((f"after (this checkout, {head.stdout.strip()})", None))
    results: dict[tuple[str, int], list[dict]] = {}
    for n in args.captions:
        make_captions(root / f"captions-{n}.parquet", n)
    for round_ in range(args.repeat):
        if args.repeat > 1:
            print(f"-- round {round_ + 1} of {args.repeat}", flush=True)
        for label, code in codes:
            for n in args.captions:
                results.setdefault((label, n), []).append(
                    run(
                        f"{label.split()[0]} {n:,}",
                        code,
                        root / f"captions-{n}.parquet",
                        features,
                        root / "work",
                        args.warm,
                    )
                )
    lo, hi = min(args.captions), max(args.captions)
    kind = f"medians of {args.repeat} runs" if args.repeat > 1 else "one run"
    print(
        f"\n{'':10s}  driver RSS {hi:,} / {lo:,} ({kind})   largest shipped {hi:,} / {lo:,}   "
        f"shipped in all {hi:,} / {lo:,}"
    )
    for label, _ in codes:
        a, b = results[label, lo], results[label, hi]
        rss_a, rss_b = (float(np.median([r["rss_mb"] for r in runs])) for runs in (a, b))
        big = lambda r: max(s for _, s in r["shipped"])
        total = lambda r: sum(s for _, s in r["shipped"])
        print(
            f"{label.split()[0]:10s}  {rss_b:7.1f} / {rss_a:7.1f} MB = {rss_b / rss_a:5.2f}   "
            f"{big(b[-1]):>11,} / {big(a[-1]):>11,} = {big(b[-1]) / big(a[-1]):6.2f}   "
            f"{total(b[-1]):>11,} / {total(a[-1]):>11,} = {total(b[-1]) / total(a[-1]):6.2f}"
        )
        if args.repeat > 1:
            for n, runs in ((lo, a), (hi, b)):
                print(f"{'':12s}driver RSS at {n:,}: " + ", ".join(f"{r['rss_mb']:.1f}" for r in runs) + " MB")


if __name__ == "__main__":
    main()
