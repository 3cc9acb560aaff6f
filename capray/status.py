"""`capray status OUTPUT`: how far a caption or extract job is, from its output folder alone.

It reads the plan (`_shards.parquet`), the driver's roll-up and heartbeat (capray.progress), and
the footers of only the shard files the roll-up does not hold yet, found one by one when they
are few or by a listing of the folder (one request per 1,000 files on S3) otherwise: never a
Parquet row, and a bounded number of objects whatever the number of shards. It works while the job runs, after it ended or was killed, and
from any machine that can read the folder. The JSON it returns is documented in docs/cli.md#status.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from capray import progress, shards, storage
from capray.inputs import InputError
from capray.pipeline import age as _age

FORMAT = "capray-status/1"
# The window of "recent" throughput, and how many footers one call reads at most (the shards that
# finished since the roll-up's last flush: about `status.every_shards` unless the driver is stuck).
WINDOW_S = 300.0
MAX_FOOTERS = 1000


def read_status(
    output: str, storage_cfg: Any, stale_periods: float = 3.0, now: float | None = None, max_footers: int = MAX_FOOTERS
) -> dict[str, Any]:
    """The job's state in `output` as a dict (the `--json` schema, docs/cli.md#status)."""
    now = time.time() if now is None else now
    entries, meta = shards.require_index(output, storage_cfg, "caption or extract")
    plan = [e for e in entries if e["state"] == "current"]
    ids = {e["id"] for e in plan}
    rolled = {r["shard"]: r for r in progress.read_rollup(output, storage_cfg) if r["shard"] in ids}

    def footer(shard_id: str) -> dict[str, Any] | bool:
        """The stats of a shard's file; True: a file without stats; False: no file."""
        try:
            found = progress.footer_stats(storage.join(output, shards.output_name(shard_id)), storage_cfg)
        except FileNotFoundError:
            return False
        return found if found and "rows" in found else True

    # A shard in the roll-up has its file (a re-run that replaces a file drops it from the plan).
    # The others: few (a job near its end, or one whose roll-up is at most a flush behind) are
    # looked up one by one, their footers being their stats; many are found by a listing, and
    # then only the footers of the files found are read.
    unknown = sorted(ids - set(rolled))
    if len(unknown) <= max_footers:
        looked = dict(zip(unknown, ThreadPoolExecutor(16).map(footer, unknown)))
        done = set(rolled) | {i for i, f in looked.items() if f is not False}
    else:
        done = ids & _file_ids(output, storage_cfg)
        rolled = {i: r for i, r in rolled.items() if i in done}
        to_read = sorted(done - set(rolled))[:max_footers]
        looked = dict(zip(to_read, ThreadPoolExecutor(16).map(footer, to_read)))
        done -= {i for i, f in looked.items() if f is False}  # replaced since the listing
    from_files = {i: f for i, f in looked.items() if isinstance(f, dict)}
    stats = list(rolled.values()) + list(from_files.values())
    without_stats = len(done) - len(stats)
    heartbeat = progress.read_heartbeat(output, storage_cfg)

    rows_known = all(e["rows"] >= 0 for e in plan)
    by_id = {e["id"]: e for e in plan}
    # Shards without stats (written by a capray before them, or beyond max_footers): the index's counts.
    done_rows = sum(s["rows"] for s in stats) + sum(
        max(by_id[i]["rows"], 0) for i in done if i not in rolled and i not in from_files
    )
    errors: dict[str, int] = {}
    for s in stats:
        for c, n in (s.get("errors") or {}).items():
            errors[c] = errors.get(c, 0) + n
    seconds = {
        k: round(sum(s.get(f"{k}_s", 0.0) for s in stats), 1)
        for k in ("read", "decode", "wait", "model", "write", "upload")
    }

    alive = False
    job: dict[str, Any] = {"state": "unknown", "alive": False}
    if heartbeat:
        age = now - heartbeat["updated_at"]
        alive = heartbeat["state"] == "running" and age <= stale_periods * heartbeat["every_s"]
        state = heartbeat["state"] if heartbeat["state"] != "running" or alive else "lost"
        job = {
            "state": state,
            "alive": alive,
            "job": heartbeat["job"],
            "run": heartbeat["run"],
            "host": heartbeat["host"],
            "pid": heartbeat["pid"],
            "started_at": heartbeat["started_at"],
            "heartbeat_at": heartbeat["updated_at"],
            "heartbeat_age_s": round(age, 1),
        }

    # Throughput from shard end times: the rows of the shards that ended in the last WINDOW_S
    # (before now while the job is alive, before its last shard otherwise), and over this run.
    ends = [s for s in stats if s.get("ended")]
    last_end = max((s["ended"] for s in ends), default=None)
    until = now if alive else last_end
    recent = overall = None
    if until is not None:
        window = [s for s in ends if until - WINDOW_S < s["ended"] <= until]
        span = min(WINDOW_S, until - min((s["started"] for s in ends), default=until))
        if window and span > 0:
            recent = sum(s["rows"] - s["copied"] for s in window) / span
        run = [s for s in ends if heartbeat and s.get("run") == heartbeat["run"]]
        if run and heartbeat:
            elapsed = until - heartbeat["started_at"]
            overall = sum(s["rows"] - s["copied"] for s in run) / elapsed if elapsed > 0 else None
    todo = [e for e in plan if e["id"] not in done]
    if rows_known:
        left_rows: float | None = sum(e["rows"] for e in todo)
    else:
        mean = done_rows / len(done) if done else None
        left_rows = None if mean is None else len(todo) * mean
    rate = recent if alive else None
    eta = round(left_rows / rate, 1) if rate and left_rows is not None else (0.0 if not todo else None)
    return {
        "format": FORMAT,
        "output": output,
        "input": meta.get("input"),
        "checked_at": now,
        "job": job,
        "shards": {
            "total": len(plan),
            "done": len(done),
            "todo": len(todo),
            "stats_rolled_up": len(rolled),
            "stats_from_footers": len(from_files),
            "stats_unknown": without_stats,
        },
        "rows": {
            "total": sum(e["rows"] for e in plan) if rows_known else None,
            "done": done_rows,
            "ok": sum(s["ok"] for s in stats),
            "failed": sum(s["failed"] for s in stats),
            "copied": sum(s["copied"] for s in stats),
        },
        "errors": dict(sorted(errors.items())),
        "bytes_read": sum(s.get("bytes_read", 0) for s in stats),
        "seconds": seconds,
        "throughput": {
            "window_s": WINDOW_S,
            "recent_rows_per_s": None if recent is None else round(recent, 2),
            "run_rows_per_s": None if overall is None else round(overall, 2),
        },
        "eta_s": eta,
        "settings": meta.get("settings", {}),
    }


def _file_ids(output: str, storage_cfg: Any) -> set[str]:
    """The shard ids that have a file in `output`: one listing, names only (as shards.done_ids).
    Through pyarrow, whose S3 listing parses each 1,000-key page in C++ without holding the GIL:
    at 10^5 files botocore's pages cost as much in this process as the requests themselves."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output, storage_cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = (i.base_name for i in infos if i.type == pafs.FileType.File)
    return {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))}


def lines(s: dict[str, Any]) -> list[str]:
    """`capray status` for people."""
    sh, rows, job = s["shards"], s["rows"], s["job"]
    total = "?" if rows["total"] is None else str(rows["total"])
    out = [f"{s['output']} (input {s['input']})"]
    if job["state"] == "unknown":
        out.append("job       no heartbeat (written by a capray before `status`, or never started)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job["started_at"]))
        out.append(
            f"job       {job['job']} run {job['run']} on {job['host']} (pid {job['pid']}), started {when}: "
            f"{job['state']}, heartbeat {_age(job['heartbeat_age_s'])} ago"
            + ("" if job["alive"] or job["state"] != "lost" else " (no heartbeat since: killed or lost)")
        )
    pct = f" ({100 * sh['done'] / sh['total']:.1f}%)" if sh["total"] else ""
    out.append(f"shards    {sh['done']} of {sh['total']} done{pct}, {sh['todo']} to do")
    out.append(
        f"rows      {rows['done']} of {total}: {rows['ok']} ok, {rows['failed']} failed, {rows['copied']} copied"
    )
    if s["errors"]:
        out.append("errors    " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    t = s["throughput"]
    fmt = lambda v: "-" if v is None else f"{v} rows/s"
    out.append(
        f"speed     last {t['window_s'] / 60:.0f} min: {fmt(t['recent_rows_per_s'])}; this run: {fmt(t['run_rows_per_s'])}"
    )
    eta = s["eta_s"]
    out.append("eta       " + ("done" if eta == 0 else "-" if eta is None else _age(eta)))
    unknown = sh["stats_unknown"]
    if unknown:
        out.append(
            f"note      {unknown} done shards have no stats (files of an earlier capray, or too many to read now)"
        )
    return out


def run(output: str, storage_cfg: Any, stale_periods: float) -> dict[str, Any]:
    """`capray status`: InputError when `output` is not there."""
    try:
        return read_status(output, storage_cfg, stale_periods)
    except OSError as e:
        raise InputError(f"cannot read {output}: {e}") from None
