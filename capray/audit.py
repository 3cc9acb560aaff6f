"""`capray audit`: a job's output folder checked against its input, image by image.

Why: the caption and extract jobs count what one run wrote; they cannot say whether the folder as a
whole still matches the input after resumed, --limit or repeated runs, a re-listed or edited input,
or files copied in by hand. The audit says, for every key (the `image` column): ok (exactly one
output row, `error` null), failed (exactly one row, `error` set), missing (in the input, no row),
duplicated (more than one row), stale (rows whose key is not in the input any more); and, as a
count, the keys the input itself lists more than once.

How, at 10^8 rows with O(shards) in the driver: a hash-partitioned group-by in plain Ray tasks.

    map tasks     one per group of input shards (`reader.read_shard`, keys only) and one per group
                  of output files (only `image` and `error` read: a features file's `features`
                  column is never fetched); each hashes its keys into P partitions and returns one
                  table per partition
    reduce tasks  one per partition: rows per key on each side (pyarrow group_by), one kind per
                  key, the keys of each problem kind written as Parquet under the report folder;
                  only counts (and a few example keys) come back to the driver

The driver lists the output folder's file names and holds the shard list, the map tasks' result
references (groups x P) and P count rows. Map groups are sized so that a partition's piece has
~10,000 rows: Ray keeps task results under 100 KB in the memory of the process that owns them,
here the driver, so tiny pieces would bring the keys back into it. Ray Data's groupby would do the
same shuffle; plain tasks keep the one-pass classification and the part files per partition
simple, and the figures of bench/audit.py are for this code.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capray import shards, storage
from capray.inputs import KEY, InputError, Plan, Shard
from capray.reader import read_shard

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)

KINDS = ("missing", "duplicated", "stale", "failed")
# The Parquet files of each problem kind: the key, and what tells the kind apart.
KIND_SCHEMAS = {
    "missing": pa.schema([(KEY, pa.string())]),
    "duplicated": pa.schema([(KEY, pa.string()), ("rows", pa.int64())]),
    "stale": pa.schema([(KEY, pa.string()), ("rows", pa.int64())]),
    "failed": pa.schema([(KEY, pa.string()), ("error", pa.string())]),
}
_INPUT_SCHEMA = pa.schema([(KEY, pa.string())])
_OUTPUT_SCHEMA = pa.schema([(KEY, pa.string()), ("error", pa.string())])
# Rows (both sides) one reduce task groups in memory: ~100-200 MB of keys and hash tables.
REDUCE_ROWS = 2_000_000
# Rows a map task aims to put in each partition's piece (see the module docstring: above Ray's
# 100 KB inline limit, so that pieces live in the object store, not in the driver).
PIECE_ROWS = 10_000
# Rows a map task reads at most when the piece size does not ask for more: enough tasks to keep
# every CPU busy, few enough that the driver's references stay (groups x partitions) small.
MAP_ROWS = 500_000
MAX_PARTITIONS = 4096
# Rows assumed for a shard whose count is unknown before it is read (a tar: img2dataset writes
# 10,000 samples per tar by default); it only sizes the partitions.
UNKNOWN_SHARD_ROWS = 10_000
BATCH_ROWS = 65_536
EXAMPLES = 5


class AuditError(RuntimeError):
    """The audit found images missing from the output, or with more than one output row."""


# --- map: keys -> one table per partition -----------------------------------------------------


def _split(table: pa.Table, parts: int) -> list[pa.Table]:
    """`table` cut into `parts` tables by a hash of its keys, the same in every process."""
    if parts == 1:
        return [table]
    import pandas as pd

    # pandas' hash is seeded with a fixed key: every task sends a key to the same partition
    # (Python's hash() is salted per process).
    part = pd.util.hash_array(table[KEY].to_numpy(zero_copy_only=False)) % np.uint64(parts)
    order = np.argsort(part, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(part.astype(np.int64), minlength=parts))])
    # take() copies each piece: a slice would pickle the whole table's buffers with it.
    return [table.take(order[bounds[i] : bounds[i + 1]]) for i in range(parts)]


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def map_input(shard_rows: list[dict[str, Any]], parts: int, cfg: Config) -> list[pa.Table]:
    """Ray task: the keys of some input shards (one row per input row, repeats kept), by partition."""
    tables = []
    for row in shard_rows:
        shard = Shard.from_row(row)
        try:
            for t in read_shard(shard, cfg, BATCH_ROWS):
                tables.append(pa.table({KEY: t[KEY].cast(pa.string())}))
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read input shard {shard.uri}: {e}") from None
    return _split(_concat(tables, _INPUT_SCHEMA).combine_chunks(), parts)


def map_output(files: list[str], parts: int, cfg: Config) -> list[pa.Table]:
    """Ray task: `image` and `error` of some output files, by partition."""
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri, cfg.storage)
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                absent = [c for c in _OUTPUT_SCHEMA.names if c not in pf.schema_arrow.names]
                if absent:
                    raise InputError(
                        f"{uri}: no {', '.join(absent)} column: not an output file of capray caption or extract"
                    )
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=_OUTPUT_SCHEMA.names):
                    tables.append(pa.Table.from_batches([batch]).cast(_OUTPUT_SCHEMA))
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read output file {uri}: {e}") from None
    return _split(_concat(tables, _OUTPUT_SCHEMA).combine_chunks(), parts)


# --- reduce: one partition's keys -> kinds, part files, counts -------------------------------


def _write(table: pa.Table, uri: str, storage_cfg: Any) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)


def reduce_partition(part: int, report_dir: str, cfg: Config, n_inputs: int, *pieces: pa.Table) -> dict[str, Any]:
    """Ray task: classify every key of partition `part`; writes `<kind>/part-<part>.parquet`
    (partition 0 always, so that every kind's folder exists and reads with its schema)."""
    inp = _concat(list(pieces[:n_inputs]), _INPUT_SCHEMA)
    out = _concat(list(pieces[n_inputs:]), _OUTPUT_SCHEMA)
    ins = inp.group_by(KEY).aggregate([([], "count_all")]).rename_columns([KEY, "n_in"])
    outs = out.group_by(KEY).aggregate([([], "count_all"), ("error", "count"), ("error", "max")])
    outs = outs.rename_columns([KEY, "n_out", "n_err", "error"])
    keys = ins.join(outs, KEY, join_type="full outer")
    listed = pc.is_valid(keys["n_in"])
    n_out = pc.fill_null(keys["n_out"], 0)
    n_err = pc.fill_null(keys["n_err"], 0)
    one = pc.equal(n_out, 1)
    masks = {
        "ok": pc.and_(listed, pc.and_(one, pc.equal(n_err, 0))),
        "failed": pc.and_(listed, pc.and_(one, pc.greater(n_err, 0))),
        "missing": pc.and_(listed, pc.equal(n_out, 0)),
        "duplicated": pc.and_(listed, pc.greater(n_out, 1)),
        "stale": pc.invert(listed),
    }
    rows = keys.set_column(keys.schema.get_field_index("n_out"), "rows", n_out)
    counts = {kind: int(pc.sum(mask).as_py() or 0) for kind, mask in masks.items()}
    counts.update(
        input_images=int(pc.sum(listed).as_py() or 0),
        input_rows=inp.num_rows,
        repeated_in_input=int(pc.sum(pc.greater(pc.fill_null(keys["n_in"], 0), 1)).as_py() or 0),
        output_rows=out.num_rows,
        stale_rows=int(pc.sum(pc.filter(n_out, masks["stale"])).as_py() or 0),
    )
    examples = {}
    for kind in KINDS:
        if counts[kind] or part == 0:
            table = rows.filter(masks[kind]).select(KIND_SCHEMAS[kind].names).sort_by(KEY).cast(KIND_SCHEMAS[kind])
            _write(table, storage.join(report_dir, kind, f"part-{part:05d}.parquet"), cfg.storage)
            examples[kind] = table[KEY].slice(0, EXAMPLES).to_pylist()
    return {"counts": counts, "examples": examples}


# --- the driver ---------------------------------------------------------------------------------


def output_files(output: str, storage_cfg: Any = None) -> list[str]:
    """The shard files of an output folder (capray.shards: `*.parquet` not starting with `_` or
    `.`; `_shards.parquet`, `_audit/`... are metadata); names only, nothing opened."""
    return [storage.join(output, shards.output_name(i)) for i in sorted(shards.done_ids(output, storage_cfg))]


def _groups(items: list[Any], sizes: Sequence[float], target: int) -> list[list[Any]]:
    """Consecutive items in groups of about `target` (size) each."""
    groups: list[list[Any]] = []
    total: float = target
    for item, size in zip(items, sizes):
        if total + size > target and (not groups or groups[-1]):
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


def _clear_report(report_dir: str, storage_cfg: Any) -> None:
    """Delete an earlier report in the caller's `report_dir`; a folder holding anything else is
    refused, not deleted (a report_dir given by mistake must not cost anyone's files)."""
    from capray import listing

    if not storage.exists(report_dir, storage_cfg):
        return
    own = {*KINDS, "report.json"}
    other = [
        e.uri
        for e in listing.walk(report_dir, storage_cfg, recursive=False)
        if e.uri.rstrip("/").rsplit("/", 1)[-1] not in own
    ]
    if other:
        raise InputError(
            f"{report_dir} holds more than an audit report (e.g. {other[0]}): give the report a folder of its own"
        )
    storage.delete_dir(report_dir, storage_cfg)


def audit(cfg: Config, plan: Plan, output: str, report_dir: str | None = None, input_uri: str = "") -> dict[str, Any]:
    """Audit `output` (the folder a caption or extract job wrote for `plan`) into `report_dir`
    (default `<output>/_audit`, replaced): `report.json` (written last) and the keys of each
    problem kind as Parquet under `missing/`, `duplicated/`, `stale/`, `failed/`. Returns the
    counts (`ok`, `failed`, `missing`, `duplicated`, `stale` ... see the module docstring), the
    report folder and the seconds taken. `input_uri` only names the input in the report."""
    import ray

    t0 = time.time()
    if not storage.exists(output, cfg.storage):
        raise InputError(f"output folder not found: {output}: nothing to audit")
    files = output_files(output, cfg.storage)
    if report_dir:
        _clear_report(report_dir, cfg.storage)
    else:  # capray's own folder in the output: replaced whole
        report_dir = storage.join(output, "_audit")
        storage.delete_dir(report_dir, cfg.storage)

    # Rows are known for most inputs (listings, Parquet footers), not for a tar or a small CSV.
    shard_rows = [s.rows if s.rows >= 0 else max(cfg.inputs.shard_rows, UNKNOWN_SHARD_ROWS) for s in plan.shards]
    rows = max(sum(shard_rows), 1)
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    parts = min(MAX_PARTITIONS, max(min(cpus, 256), math.ceil(2 * rows / REDUCE_ROWS)))
    group_rows = max(parts * PIECE_ROWS, min(MAP_ROWS, math.ceil(rows / cpus)))
    per_file = rows / max(len(plan.shards), 1)  # one output file per input shard
    in_groups = _groups([s.to_row() for s in plan.shards], shard_rows, group_rows)
    out_groups = _groups(files, [per_file] * len(files), group_rows)
    log.info(
        "audit: %d input shards, %d output files: %d + %d map tasks, %d partitions",
        len(plan.shards),
        len(files),
        len(in_groups),
        len(out_groups),
        parts,
    )

    cfg_ref = ray.put(cfg)
    mapper_in = ray.remote(num_cpus=1)(map_input).options(num_returns=parts)
    mapper_out = ray.remote(num_cpus=1)(map_output).options(num_returns=parts)

    def refs(r: Any) -> list:
        return r if parts > 1 else [r]

    ins = [refs(mapper_in.remote(g, parts, cfg_ref)) for g in in_groups]
    outs = [refs(mapper_out.remote(g, parts, cfg_ref)) for g in out_groups]
    reducer = ray.remote(num_cpus=1)(reduce_partition)
    pending = [
        reducer.remote(p, report_dir, cfg_ref, len(ins), *[r[p] for r in ins], *[r[p] for r in outs])
        for p in range(parts)
    ]
    # The pending reduce tasks keep their pieces alive; dropping these lets each piece go as soon
    # as its reduce task is done.
    del ins, outs
    results = ray.get(pending)

    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for kind, keys in r["examples"].items():
            examples[kind] = sorted(examples[kind] + keys)[:EXAMPLES]
    summary: dict[str, Any] = {
        "input": input_uri or getattr(plan, "input", "") or f"{plan.kind} input of {len(plan.shards)} shards",
        "output": output,
        "report_dir": report_dir,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input_shards": len(plan.shards),
        "output_files": len(files),
        **{
            k: counts.get(k, 0)
            for k in (
                "input_images",
                "input_rows",
                "repeated_in_input",
                "output_rows",
                "ok",
                "failed",
                "missing",
                "duplicated",
                "stale",
                "stale_rows",
            )
        },
        "partitions": parts,
        "seconds": round(time.time() - t0, 2),
    }
    report = {**summary, "examples": examples, "files": {kind: storage.join(report_dir, kind) for kind in KINDS}}
    storage.write_bytes(storage.join(report_dir, "report.json"), json.dumps(report, indent=1).encode(), cfg.storage)
    return summary


def verdict(summary: dict[str, Any]) -> str:
    """One line: `audit: 400 images: 398 ok, 2 failed, 0 missing, 0 duplicated, 0 stale -> <report>`."""
    s = summary
    repeated = f" ({s['repeated_in_input']} listed more than once in the input)" if s["repeated_in_input"] else ""
    return (
        f"audit: {s['input_images']} images{repeated}: {s['ok']} ok, {s['failed']} failed, {s['missing']} missing, "
        f"{s['duplicated']} duplicated, {s['stale']} stale -> {s['report_dir']}"
    )


def _level(summary: dict[str, Any]) -> int:
    """The verdict is a problem (WARNING) when an image is missing or duplicated."""
    return logging.WARNING if summary["missing"] or summary["duplicated"] else logging.INFO


def _target(cfg: Config, job: str) -> tuple[Plan, str, str]:
    """(plan, input, output folder) of the caption or extract job as `cfg` configures it."""
    from capray.config import output_paths

    if job == "caption":
        from capray import captioning

        return captioning.job_plan(cfg), cfg.caption.input, output_paths(cfg)["captions"]
    from capray import extraction

    return (
        extraction.job_plan(cfg),
        cfg.extract.input or "the images of the training split",
        output_paths(cfg)["features"],
    )


def after_job(cfg: Config, job: str) -> dict[str, Any]:
    """The audit of a caption or extract job that just finished (`audit.after_job`): its verdict
    logged, its problems reported but not raised (the job itself succeeded). A listed folder is
    compared as the job listed it (its saved listing), not as it is a moment later."""
    from capray.config import updated

    plan, input_uri, output = _target(updated(cfg, {"inputs": {"relist": False}}), job)
    summary = audit(cfg, plan, output, input_uri=input_uri)
    log.log(_level(summary), "%s: %s", job, verdict(summary))
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """`capray audit`: audit the output of `audit.job`; AuditError (after the report is written)
    when an image is missing or duplicated."""
    job = cfg.audit.job
    plan, input_uri, output = _target(cfg, job)
    summary = audit(cfg, plan, output, input_uri=input_uri)
    log.log(_level(summary), verdict(summary))
    if summary["missing"] or summary["duplicated"]:
        raise AuditError(
            f"{summary['missing']} missing and {summary['duplicated']} duplicated of {summary['input_images']} images "
            f"in {output}: their keys are under {summary['report_dir']} (missing/, duplicated/)"
        )
    return summary
