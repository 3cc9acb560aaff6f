"""`capray audit` at 1M rows: wall time and driver memory of the hash-partitioned audit (capray/audit.py).

A benchmark, not a test: `.venv/bin/python bench/audit.py [--rows 1000000] [--dir /tmp/capray-audit]`.
The input is a manifest of `--rows` keys in Parquet files of 10,000 rows (bench/scale.py's
`make_manifests`; `inputs.shard_rows=10000`, so one shard per file); the output, as a caption job
writes it, one Parquet file per shard with the same keys (image, caption, error), then 10 keys
missing, 10 duplicated (a second row in the next file), 10 stale (keys not in the input) and 10
failed (`error` set) planted. The audit runs on local Ray in this process; the driver's peak RSS is
measured above its idle `ray.init` (as bench/scale.py does), and every planted key must be found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import FILE_ROWS, PeakRSS, make_manifests

PLANTED = 10


def cpu_model() -> str:
    """`lscpu`'s Model name."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def make_output(manifests: Path, output: Path) -> dict[str, set[str]]:
    """One output file per manifest file with its keys, and the planted problems (returned)."""
    planted: dict[str, set[str]] = {"missing": set(), "duplicated": set(), "stale": set(), "failed": set()}
    output.mkdir(parents=True, exist_ok=True)
    files = sorted(manifests.glob("*.parquet"))
    assert len(files) >= 4 * PLANTED, f"{len(files)} manifest files: need {4 * PLANTED} to plant in"
    extra: dict[int, list[str]] = {}
    for k, f in enumerate(files):
        keys = pq.read_table(f, columns=["image"])["image"].to_pylist()
        errors = [None] * len(keys)
        if k < PLANTED:  # the first key of files 0-9: no row
            planted["missing"].add(keys.pop(0))
            errors.pop()
        elif k < 2 * PLANTED:  # files 10-19: a second row in the next file
            planted["duplicated"].add(keys[0])
            extra.setdefault(k + 1, []).append(keys[0])
        elif k < 3 * PLANTED:  # files 20-29: a row for an image not in the input
            planted["stale"].add(f"s3://bucket/removed/{k:05d}.jpg")
            extra.setdefault(k, []).append(f"s3://bucket/removed/{k:05d}.jpg")
        elif k < 4 * PLANTED:  # files 30-39: the first key failed
            planted["failed"].add(keys[0])
            errors[0] = "cannot decode image: planted"
        keys += extra.get(k, [])
        errors += [None] * (len(keys) - len(errors))
        table = pa.table(
            {
                "image": pa.array(keys, pa.string()),
                "caption": pa.array([None if e else "a stand-in caption" for e in errors], pa.string()),
                "error": pa.array(errors, pa.string()),
            }
        )
        pq.write_table(table, output / f"{f.stem}.parquet", row_group_size=10_000)
    (output / "_capray_config.yaml").write_text("name: bench-audit\n")  # metadata beside the data, ignored
    return planted


def run_audit_bench(n_rows: int, folder: str | Path) -> dict:
    """Generate (once) a manifest of `n_rows` keys and its planted output under `folder`, audit it
    on local Ray (this process's, started if need be) and return the figures."""
    import ray

    from capray import audit, inputs, storage
    from capray.config import load_config
    from capray.runtime import init_ray

    folder = Path(folder)
    manifests, output = folder / f"manifest-{n_rows}", folder / f"output-{n_rows}"
    t0 = time.time()
    make_manifests(manifests, n_rows)
    if not (output / "_planted.json").exists():
        planted = make_output(manifests, output)
        (output / "_planted.json").write_text(json.dumps({k: sorted(v) for k, v in planted.items()}))
    planted = {k: set(v) for k, v in json.loads((output / "_planted.json").read_text()).items()}
    generated = time.time() - t0

    cfg = load_config(None, [f"work_dir={folder / 'work'}", f"inputs.shard_rows={FILE_ROWS}"])
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    time.sleep(2)  # let the driver settle after ray.init before the idle baseline
    rss = PeakRSS()
    t0 = time.time()
    plan = inputs.plan(cfg, str(manifests), str(folder / "work" / "inputs"))
    t_plan = time.time() - t0
    s = audit.audit(cfg, plan, str(output))
    wall = time.time() - t0
    driver_mb = rss.stop()

    expected = n_rows - PLANTED * 3  # every key but the missing, duplicated and failed ones
    assert (s["input_images"], s["ok"]) == (n_rows, expected), s
    for kind, keys in planted.items():
        assert s[kind] == len(keys), (kind, s[kind], len(keys))
        fs, path = storage.filesystem(storage.join(s["report_dir"], kind))
        found = set(pq.read_table(path, filesystem=fs)["image"].to_pylist())
        assert found == keys, (kind, sorted(found ^ keys)[:5])
    return {
        "cpu": cpu_model(),
        "rows": n_rows,
        "input_shards": s["input_shards"],
        "output_files": s["output_files"],
        "partitions": s["partitions"],
        "plan_s": round(t_plan, 2),
        "audit_s": s["seconds"],
        "wall_s": round(wall, 2),
        "rows_per_s": round((s["input_rows"] + s["output_rows"]) / wall),
        "driver_mb": round(driver_mb, 1),
        "idle_mb": round(rss.idle / 2**20),
        "generate_s": round(generated, 1),
        **{k: s[k] for k in ("ok", "failed", "missing", "duplicated", "stale", "output_rows")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="input keys (a multiple of 10,000, at least 400,000)"
    )
    parser.add_argument(
        "--dir", default="/tmp/capray-audit", help="where the input and output are generated (kept for re-runs)"
    )
    args = parser.parse_args()
    r = run_audit_bench(args.rows, args.dir)
    print(f"cpu        {r['cpu']}")
    print(
        f"audit      {r['rows']:,} input keys ({r['input_shards']} shards), {r['output_rows']:,} output rows "
        f"({r['output_files']} files), {r['partitions']} partitions"
    )
    print(
        f"time       wall {r['wall_s']} s (plan {r['plan_s']} s, audit {r['audit_s']} s), {r['rows_per_s']:,} rows/s (both sides)"
    )
    print(f"driver     +{r['driver_mb']} MB peak RSS above the idle ray.init driver ({r['idle_mb']} MB)")
    print(
        f"found      {r['ok']:,} ok, {r['failed']} failed, {r['missing']} missing, {r['duplicated']} duplicated, "
        f"{r['stale']} stale: every planted key, by name"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
