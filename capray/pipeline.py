"""The image-job pipeline both extraction and captioning run, from the driver: shards to actors.

    plan (capray.inputs) -> shards.reconcile -> Ray Data actor pool (capray.worker, one shard
    per call) -> <output>/<shard id>.parquet (capray.writer) -> shards.finish

Each actor holds the model (InceptionV3, + the decoder for captions) and processes a whole shard,
so a shard's rows never cross the object store (memory per actor: a few batches of pixels), a
file appears as soon as its shard is done (progress is kept as the job goes), and a re-run lists
the output folder's file names and skips the shards that have a file: resume costs O(shards).
The driver holds the shard list and one small summary row per shard, never a row per image;
this module also prints the job's progress and turns Ray's errors into the job's own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from capray import listing, progress, shards
from capray.inputs import InputError, Plan
from capray.shards import output_name
from capray.worker import ERROR_EXAMPLES, ShardWorker

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job stopped part-way (storage down, worker lost...); every file it wrote is complete."""


def run(
    cfg: Config,
    plan: Plan,
    output: str,
    model_cls: Callable[..., Any],
    model_kwargs: dict[str, Any],
    job_cfg: Any,
    empty_schema: pa.Schema,
    label: str,
    worker_cls: type = ShardWorker,
    error_cls: type[JobError] = JobError,
    compression: str = "snappy",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Process every shard of `plan` that `output` does not hold yet (capray.shards); returns the
    job summary.

    `job_cfg` is the job's section (batch_size, min_actors, max_actors, num_gpus); `worker_cls`
    is replaced only by benchmarks (bench/scale.py: a stand-in without decoding); `compression`
    is the output files' Parquet codec; `settings` what the output depends on besides the input
    (checkpoint, decoding, precision...): recorded in the index and in every file, and a re-run
    with others into the same output is refused.
    """
    import ray

    start = time.time()
    settings = settings or {}
    for line in listing_lines(label, plan):
        log.info(line)
    dry = cfg.inputs.dry_run
    try:
        work = shards.reconcile(cfg, plan, output, settings, write=not dry)
    except OSError as e:
        raise InputError(f"cannot read the output folder {output}: {e}") from None
    todo = work.todo[: cfg.inputs.limit_shards] if cfg.inputs.limit_shards else work.todo
    if dry:
        return {"dry_run": True, "plan": plan_summary(cfg, plan, work, todo, output, job_cfg), "output": output}
    summary: dict[str, Any] = {
        "shards": len(plan.shards),
        "shards_done_before": len(work.done),
        "shards_written": 0,
        "images": plan.rows,
        "already_done": None if any(s.rows < 0 for s in work.done) else sum(s.rows for s in work.done),
        "written": 0,
        "failed": 0,
        "duplicates": 0,
        "copied": 0,
        "errors": [],
        # storage requests tried again after transient errors (throttling, outages)
        "retried": 0,
        # actor seconds in the model, and waiting for images to be read and decoded
        "model_s": 0.0,
        "wait_s": 0.0,
        # failed rows by class (capray.images.ERROR_CLASSES)
        "error_classes": {},
        # output file -> rows, as the workers reported them (O(shards)): manifests use these
        "files": {},
    }
    for line in work_lines(label, work, output):
        log.info(line)
    written: dict[str, tuple[int, int]] = {}
    rollup = progress.Rollup(cfg, output, label, [s.id for s in plan.shards], {s.id for s in work.done})
    if todo:
        log.info(f"{label}: {len(todo)} of {len(plan.shards)} shards to do ({len(work.done)} already done) -> {output}")
        # One block per shard: each actor call is one whole shard. `range` makes the blocks
        # lazily in read tasks; the shard descriptors travel once, with the actor class.
        ds = ray.data.range(len(todo), override_num_blocks=len(todo))
        ds = ds.map_batches(
            worker_cls,
            fn_constructor_kwargs=dict(
                shards=[s.to_row() for s in todo],
                output=output,
                cfg=cfg,
                model_cls=model_cls,
                model_kwargs=model_kwargs,
                batch_size=job_cfg.batch_size,
                empty_schema=empty_schema,
                compression=compression,
                settings=settings,
                run=rollup.run,
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=job_cfg.min_actors, max_size=job_cfg.max_actors),
            num_gpus=job_cfg.num_gpus,
        )
        last = time.time()
        try:
            for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(part["shard"])):
                    shard_id = str(part["shard"][i])
                    written[shard_id] = (int(part["rows"][i]), int(part["failed"][i]))
                    summary["shards_written"] += 1
                    summary["files"][output_name(shard_id)] = int(part["rows"][i])
                    summary["written"] += int(part["rows"][i])
                    summary["failed"] += int(part["failed"][i])
                    summary["duplicates"] += int(part["duplicates"][i])
                    summary["copied"] += int(part["copied"][i])
                    summary["retried"] += int(part["retried"][i])
                    summary["model_s"] += float(part["model_s"][i])
                    summary["wait_s"] += float(part["wait_s"][i])
                    summary["errors"] = (summary["errors"] + json.loads(part["errors"][i]))[: ERROR_EXAMPLES * 4]
                    stats = json.loads(part["stats"][i])
                    for c, n in stats["errors"].items():
                        summary["error_classes"][c] = summary["error_classes"].get(c, 0) + n
                    rollup.add(stats)
                if time.time() - last >= 10:
                    last = time.time()
                    rate = summary["written"] / max(last - start, 1e-9)
                    log.info(
                        f"{label}: {summary['shards_written']}/{len(todo)} shards, {summary['written']} rows "
                        f"({summary['failed']} failed), {rate:.1f} rows/s"
                    )
        except Exception as e:  # Ray wraps the worker's error (e.g. OSError from S3) in its own types
            rollup.close("stopped")
            try:
                _record(cfg, plan, output, work, written)
            except OSError as storage_down:  # the index written at the start already names every shard
                log.warning("%s: could not update %s after the stop: %s", label, shards.INDEX, storage_down)
            raise error_cls(
                f"{label} job stopped before every shard was written to {output} ({summary['shards_written']} of "
                f"{len(todo)} written; {root_cause(e)}); the files already there are complete and kept: "
                "re-run the same command to do the rest"
            ) from e
    rollup.close("finished")
    summary["cleanup"] = _record(cfg, plan, output, work, written)
    seconds = time.time() - start
    busy = summary["model_s"] + summary["wait_s"]
    summary["wait_share"] = round(summary["wait_s"] / busy, 3) if busy else 0.0
    computed = summary["written"] - summary["copied"]
    summary.update(
        remaining_shards=sum(1 for s in work.todo if s.id not in written and s.id not in work.retry_ids),
        seconds=round(seconds, 1),
        # Images through the model: rows copied from the files a shard replaces cost no model time.
        images_per_s=round(computed / max(seconds, 1e-9), 1),
        output=output,
        computed=computed,
    )
    return summary


def _record(
    cfg: Config, plan: Plan, output: str, work: shards.Work, written: dict[str, tuple[int, int]]
) -> dict[str, int]:
    """Replace what the written shards supersede and record them in the index (also after a stop)."""
    done = shards.finish(cfg, plan, output, work, written)
    if any(done.values()):
        log.info(
            "%s: %d replaced files deleted, %d of removed input files, %d from before content-bound shards",
            output,
            done["replaced"],
            done["pruned"],
            done["legacy_removed"],
        )
    return done


def plan_summary(
    cfg: Config, plan: Plan, work: shards.Work, todo: list[Any], output: str, job_cfg: Any
) -> dict[str, Any]:
    """A dry run's answer: shards, rows, what is done, and an estimate from earlier shards' stats."""
    try:
        earlier = progress.read_rollup(output, cfg.storage)
    except OSError:
        earlier = []
    computed = sum(r["rows"] - r["copied"] for r in earlier)
    busy = sum(max(r["ended"] - r["started"], 0.0) for r in earlier if r["rows"] > r["copied"])
    per_actor = computed / busy if computed and busy else None
    known = [s.rows for s in todo if s.rows >= 0]
    mean = (sum(r["rows"] for r in earlier) / len(earlier)) if earlier else None
    todo_rows: float | None = None
    if len(known) == len(todo):
        todo_rows = sum(known)
    elif mean is not None:
        todo_rows = sum(known) + (len(todo) - len(known)) * mean
    rate = per_actor * job_cfg.max_actors if per_actor else None
    return {
        "input": plan.input,
        "shards": len(plan.shards),
        "rows": plan.rows,
        "done_shards": len(work.done),
        "done_rows": None if any(s.rows < 0 for s in work.done) else sum(s.rows for s in work.done),
        "todo_shards": len(todo),
        "todo_rows": None if todo_rows is None else int(todo_rows),
        "superseded_files": len(work.superseded),
        "earlier_shards_with_stats": len(earlier),
        "rows_per_s_per_actor": None if per_actor is None else round(per_actor, 2),
        "max_actors": job_cfg.max_actors,
        "estimate_s": None if rate is None or todo_rows is None else round(todo_rows / rate, 1),
    }


def plan_lines(label: str, p: dict[str, Any]) -> list[str]:
    """The dry run's lines."""
    rows = "" if p["rows"] is None else f" ({p['rows']} images)"
    done = "" if p["done_rows"] is None else f" ({p['done_rows']} images)"
    todo = "" if p["todo_rows"] is None else f" ({p['todo_rows']} images)"
    lines = [
        f"{label}: dry run, nothing done: {p['input']}: {p['shards']} shards{rows}; {p['done_shards']} done{done}, "
        f"{p['todo_shards']} to do{todo}, {p['superseded_files']} earlier files to replace or delete"
    ]
    if p["estimate_s"] is not None:
        lines.append(
            f"{label}: estimate {age(p['estimate_s'])} with {p['max_actors']} actors, at the "
            f"{p['rows_per_s_per_actor']} images/s per actor of {p['earlier_shards_with_stats']} earlier shards"
        )
    else:
        lines.append(f"{label}: no estimate: no earlier shard of this output has stats (or the row counts are unknown)")
    return lines


def age(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"


def listing_lines(label: str, plan: Plan) -> list[str]:
    """The job's first lines for a listed folder/prefix: which listing, how old, what changed."""
    own = (
        [f"{label}: left out of the input, as this job's own folders: {', '.join(plan.left_out)}"]
        if plan.left_out
        else []
    )
    info = plan.listing
    if not info:
        return own
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["taken_at"]))
    old = age(time.time() - info["taken_at"])
    if info["reused"]:
        head = f"using the saved listing of {plan.input} taken {when} ({old} old; inputs.relist=true lists again)"
    else:
        head = f"listed {plan.input} now ({when}; inputs.relist=false would reuse the saved listing)"
    lines = [f"{label}: {head}: {plan.rows} images in {len(plan.shards)} shards"]
    if info.get("passed_over"):
        lines.append(
            f"{label}: passed over {sum(info['passed_over'].values())} other files, not images by "
            f"inputs.extensions/inputs.glob: {listing.passed_summary(info['passed_over'])}"
        )
    lines.extend(own)
    c = info.get("changes")
    if info.get("before_taken_at") is None:
        lines.append(f"{label}: no earlier listing of this input to compare with")
    elif c is None:
        lines.append(f"{label}: the earlier listing could not be compared with (see the warning above)")
    else:
        before = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["before_taken_at"]))
        lines.append(
            f"{label}: since the listing of {before}: {c['new']} new, {c['changed']} changed, "
            f"{c['removed']} removed, {c['unchanged']} unchanged images"
        )
    return lines


def work_lines(label: str, work: shards.Work, output: str) -> list[str]:
    """What the output folder holds against the plan: done, to do, replaced, kept, legacy."""
    lines = []
    replaced = [i for i, by in work.superseded.items() if by]
    pruned = [i for i, by in work.superseded.items() if not by]
    if replaced or pruned or work.kept or work.retried:
        lines.append(
            f"{label}: {output}: {len(work.done)} shards done, {len(work.todo)} to do "
            f"({work.copy_sources} copy the rows of unchanged images from the {len(replaced)} files they replace"
            + (f"; {work.retried} redone for their failed rows (inputs.retry_failed)" if work.retried else "")
            + ")"
            + (
                f"; {len(pruned)} files of input files that are gone are deleted at the end (inputs.removed=prune)"
                if pruned
                else ""
            )
            + (
                f"; {len(work.kept)} files of input files that are gone are kept (inputs.removed=keep)"
                if work.kept
                else ""
            )
        )
    if work.legacy:
        lines.append(
            f"{label}: {output}: {len(work.legacy)} files were written by a capray without content-bound "
            "shards: their images are done again, and the old files are deleted once every shard is written"
        )
    return lines


def report_lines(label: str, s: dict[str, Any]) -> list[str]:
    """The summary's notes on retries and on how busy the model was, for the job's log."""
    lines = []
    if s.get("retried"):
        lines.append(
            f"{label}: {s['retried']} storage requests were tried again after transient errors "
            "(throttling, dropped connections; storage.retries)"
        )
    if s.get("model_s"):
        lines.append(
            f"{label}: the model waited for images {s['wait_share']:.0%} of its time "
            f"({s['wait_s']:.1f} s waiting, {s['model_s']:.1f} s computing, summed over actors)"
            + (
                "; decoding does not keep up: raise inputs.io_threads, or give the actors' nodes more CPUs"
                if s["wait_share"] > 0.1
                else ""
            )
        )
    return lines


def root_cause(e: BaseException) -> str:
    """The innermost error under Ray's wrappers, as `Type: first line`.

    Ray Data re-raises a worker's error as RayTaskError(UserCodeException) whose chain, once in
    the driver, may end at "UDF failed to process a data block"; the worker's own error is then
    only in the remote traceback text, where it is the first `SomeError: message` line.
    """
    seen = set()
    outer = e
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    if type(e).__name__ in ("UserCodeException", "RayTaskError") or "UDF failed" in str(e):
        import re

        for line in str(outer).splitlines():
            m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$", line.strip())
            if m and not m.group(1).endswith(("RayTaskError", "UserCodeException")):
                return f"{m.group(1)}: {m.group(2)}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
