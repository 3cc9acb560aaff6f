"""An output folder's shard files: which are done, which a change of the input superseded, and
what they were made with. The driver's side of resume, O(shards): file names and one index.

    <output>/<shard id>.parquet   one file per shard (capray.inputs: `<location>.<content digest>`)
    <output>/_shards.parquet      the index: each file's shard (kind, source file, key range, rows,
                                  failed rows, state: current | superseded | kept); its metadata
                                  holds the input and the settings
                                  (checkpoint, decoding, precision...) the files were made with

A shard is done when a file with its id exists: the id digests the shard's input content, so an
input that changed is never taken for done. A file that is not in the current plan was made from
an earlier version of the input: the current shards that cover the same keys (a listing's key
ranges) or the same input file (manifests, tars, Parquet) replace it, and it is deleted once all
of them are written, so a finished run leaves every current image exactly once. A listed image
whose key and version are unchanged is copied from the old file rather than run through the
model again (capray.pipeline). Files of input files that are gone are deleted too, or kept with
`inputs.removed=keep`. The index is written before the work (so a killed run's files are known)
and again at the end.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray import listing, storage
from capray.inputs import InputError, Plan, Shard

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)
INDEX = "_shards.parquet"
FORMAT = "capray-shards/1"
_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("lo", pa.string()),
        ("hi", pa.string()),
        ("rows", pa.int64()),
        ("failed", pa.int64()),
        ("state", pa.string()),
    ]
)


class OutputMismatchError(InputError):
    """The output folder holds the output of another input or of other settings."""


def output_name(shard_id: str) -> str:
    """The output file of a shard."""
    return f"{shard_id}.parquet"


def done_ids(output: str, storage_cfg: Any = None) -> set[str]:
    """Ids of the shard files in `output`: a listing of file names, nothing read."""
    if not storage.exists(output, storage_cfg):
        return set()
    names = (os.path.basename(e.uri) for e in listing.walk(output, storage_cfg, recursive=False) if not e.is_dir)
    return {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))}


def read_index(output: str, storage_cfg: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The index's entries and its metadata (None when the folder has no index)."""
    uri = storage.join(output, INDEX)
    if not storage.exists(uri, storage_cfg):
        return [], None
    fs, path = storage.filesystem(uri, storage_cfg)
    with fs.open_input_file(path) as f:
        # ParquetFile, not read_table: that would load pyarrow.dataset into the driver (~6 MB).
        table = pq.ParquetFile(f).read(use_threads=False)
    meta = json.loads((table.schema.metadata or {}).get(b"capray", b"{}"))
    return table.to_pylist(), meta


def require_index(output: str, storage_cfg: Any, job: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`read_index` of a job's output folder (`capray status`, `capray overview`): InputError when
    the folder is missing or is not the output of a `job` ("caption", "caption or extract")."""
    from capray.inputs import InputError

    entries, meta = read_index(output, storage_cfg)
    if meta is None:
        # Only here: on S3 a folder's existence is a listing, which a server may make O(all its keys).
        if not storage.exists(output, storage_cfg):
            raise InputError(f"output folder not found: {output}")
        raise InputError(
            f"{output} has no {INDEX}: not the output folder of a {job} job (or it has not started)"
            + _outputs_below(output, storage_cfg, ("captions",) if job == "caption" else ("captions", "features"))
        )
    return entries, meta


def _outputs_below(folder: str, storage_cfg: Any, names: tuple[str, ...]) -> str:
    """What `folder` is instead, when it is a work_dir (job outputs at `captions/`, `features/`:
    `names`) or a training run's folder: a few existence checks, no listing."""
    found = [
        storage.join(folder, name) for name in names if storage.exists(storage.join(folder, name, INDEX), storage_cfg)
    ]
    if found:
        return f"; the job output folders below it: {', '.join(found)}"
    if storage.exists(storage.join(folder, "best.json"), storage_cfg) or storage.exists(
        storage.join(folder, "tensorboard"), storage_cfg
    ):
        return (
            "; it is a training run's folder: its best checkpoint is in best.json, its curves in "
            f"TensorBoard (tensorboard --logdir {storage.join(folder, 'tensorboard')})"
        )
    return ""


def _is_output_entry(e: listing.Entry) -> bool:
    """A shard file or one of capray's own entries (`_shards.parquet`, `_status/`...); hidden ones too."""
    name = posixpath.basename(e.uri.rstrip("/"))
    return name.startswith(("_", ".")) or (not e.is_dir and name.endswith(".parquet"))


def check_clearable(output: str, keep: dict[str, str], storage_cfg: Any, option: str) -> None:
    """InputError unless `option` (`caption.overwrite`...) may delete the folder `output`: it must
    not be, or hold, any of `keep` (what the job reads or keeps: its input, work_dir, checkpoint;
    by name), and may hold only what capray writes there (shard files, `_` entries), so that a
    wrong `output=` deletes nobody's images. One listing of the folder's top level (O(shards))."""
    for name, uri in keep.items():
        if uri and (listing.same_folder(uri, output) or listing.inside(output, [uri])):
            raise InputError(
                f"{option}=true would delete {output}, which is or holds the {name} {uri}: "
                "give the job an output folder of its own"
            )
    if not storage.exists(output, storage_cfg):
        return
    other = [e.uri for e in listing.walk(output, storage_cfg, recursive=False) if not _is_output_entry(e)]
    if other:
        raise InputError(
            f"{option}=true would delete {output}, which holds more than capray's output ({len(other)} other "
            f"entries, e.g. {other[0]}): give the job an output folder of its own, or empty this one yourself"
        )
    # The other image job's output (features for captions, or the reverse): hours of work, not this job's.
    job = option.split(".")[0]
    _, meta = read_index(output, storage_cfg)
    made_by = {key.split(".")[0] for key in (meta or {}).get("settings", {})} & {"caption", "extract"}
    if made_by and job not in made_by:
        raise InputError(
            f"{option}=true would delete {output}, which holds the {made_by.pop()} job's output: "
            f"give the {job} job an output folder of its own"
        )


def clear(output: str, keep: dict[str, str], storage_cfg: Any, option: str) -> None:
    """Delete the output folder for `option`, once `check_clearable` allows it."""
    check_clearable(output, keep, storage_cfg, option)
    storage.delete_dir(output, storage_cfg)


def write_index(output: str, storage_cfg: Any, entries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    table = pa.Table.from_pylist(entries, schema=_SCHEMA).replace_schema_metadata({"capray": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(storage.join(output, INDEX), sink.getvalue().to_pybytes(), storage_cfg)


def _entry(s: Shard, rows: int, failed: int) -> dict[str, Any]:
    return {
        "id": s.id,
        "kind": s.kind,
        "source": s.source,
        "lo": s.lo,
        "hi": s.hi,
        "rows": rows,
        "failed": failed,
        "state": "current",
    }


def check_same(meta: dict[str, Any], input_uri: str, settings: dict[str, Any], output: str) -> None:
    """OutputMismatchError unless `output` was made from the same input with the same settings."""
    if meta.get("input", "").rstrip("/") != input_uri.rstrip("/"):
        raise OutputMismatchError(
            f"{output} holds the output of input {meta.get('input')}, not {input_uri}: give each input its own output "
            "folder (output=... or work_dir=...), or replace it with --overwrite"
        )
    from capray.config import current_key

    # An output written before a config key was renamed recorded it under its old name.
    old = {current_key(k): v for k, v in meta.get("settings", {}).items()}
    changed = [
        f"{k}: {old.get(k)} -> {settings.get(k)}"
        for k in sorted(set(old) | set(settings))
        if old.get(k) != settings.get(k)
    ]
    if changed:
        raise OutputMismatchError(
            f"{output} was made with other settings ({'; '.join(changed)}); its files would mix with this run's: "
            "write to another output folder, or redo it all with --overwrite"
        )


@dataclass
class Work:
    """What a run has to do in an output folder, and what it replaces."""

    todo: list[Shard]
    done: list[Shard]
    # old file id -> the current shard ids that replace it (deleted once all are written; [] =
    # its input file is gone, deleted at the end)
    superseded: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # files of input files that are gone, kept (inputs.removed=keep)
    legacy: list[str] = field(default_factory=list)  # shard files without an index entry (capray before 0.2)
    retry_ids: set[str] = field(default_factory=set)  # done shards redone for their failed rows (inputs.retry_failed)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # the old index, by id
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def retried(self) -> int:
        return len(self.retry_ids)

    @property
    def copy_sources(self) -> int:
        return sum(1 for s in self.todo if s.sources)


def _refuse_foreign(output: str, ids: list[str], storage_cfg: Any) -> None:
    """InputError when files of `output` that no index lists (`ids`) are not capray's: an earlier
    capray's output has its `image` and `error` columns, and is redone and deleted; any other
    Parquet file is somebody's data, which a run must neither mix with its own nor delete.
    One footer per such file, in threads (none at all for a folder capray made)."""
    fs, path = storage.filesystem(output, storage_cfg)

    def foreign(shard_id: str) -> bool:
        try:
            names = pq.read_schema(f"{path.rstrip('/')}/{output_name(shard_id)}", filesystem=fs).names
        except (OSError, pa.ArrowException):
            return True
        return not {"image", "error"} <= set(names)

    found = [i for i, bad in zip(ids, ThreadPoolExecutor(16).map(foreign, ids)) if bad] if ids else []
    if found:
        raise InputError(
            f"{output} holds {len(found)} Parquet file(s) that capray did not write (e.g. {output_name(found[0])}, "
            "without its image and error columns): give the job an output folder of its own"
        )


def reconcile(cfg: Config, plan: Plan, output: str, settings: dict[str, Any], write: bool = True) -> Work:
    """Compare the plan with what `output` holds; write the index of both before any work
    (unless not `write`: a dry run leaves the folder as it is)."""
    present = done_ids(output, cfg.storage)
    old_entries, meta = read_index(output, cfg.storage)
    if meta is not None:
        check_same(meta, plan.input, settings, output)
    entries = {e["id"]: e for e in old_entries}
    current = {s.id for s in plan.shards}
    others = sorted(present - current)
    legacy = [i for i in others if i not in entries]
    _refuse_foreign(output, legacy, cfg.storage)
    old = [entries[i] for i in others if i in entries]
    superseded: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = defaultdict(list)
    old_ranges = [e for e in old if e["kind"] == "listing"]
    if plan.kind == "files":
        # A listing's ranges partition the keys: every old listing file is covered by the
        # current shards overlapping its range, which copy its unchanged rows.
        for s, js in zip(
            plan.shards, listing.overlaps([(s.lo, s.hi) for s in plan.shards], [(e["lo"], e["hi"]) for e in old_ranges])
        ):
            for j in js:
                superseded.setdefault(old_ranges[j]["id"], []).append(s.id)
                sources[s.id].append(output_name(old_ranges[j]["id"]))
    else:
        by_source: dict[str, list[str]] = defaultdict(list)
        for s in plan.shards:
            by_source[s.source].append(s.id)
        for e in old:
            if e["source"] in by_source:  # the same input file, rewritten: redone as a whole
                superseded[e["id"]] = by_source[e["source"]]
    kept = []
    for e in old:
        if e["id"] not in superseded:  # its input file is gone
            if cfg.inputs.removed == "keep":
                kept.append(e["id"])
            else:
                superseded[e["id"]] = []
    done = [s for s in plan.shards if s.id in present]
    todo = [replace(s, sources=tuple(sources[s.id])) for s in plan.shards if s.id not in present]
    retry: set[str] = set()
    if cfg.inputs.retry_failed:
        # Failed counts come from the index; a file the index does not count is looked at by its worker.
        retry = {s.id for s in done if entries.get(s.id, {}).get("failed", -1) != 0}
        todo += [replace(s, sources=(output_name(s.id),)) for s in done if s.id in retry]
        done = [s for s in done if s.id not in retry]
    meta = {"format": FORMAT, "input": plan.input, "settings": settings}
    work = Work(todo, done, superseded, kept, legacy, retry, entries, meta)
    if write:
        write_index(output, cfg.storage, _entries(plan, work, {}), meta)
    return work


def _entries(
    plan: Plan, work: Work, written: dict[str, tuple[int, int]], gone: frozenset[str] | set[str] = frozenset()
) -> list[dict[str, Any]]:
    out = []
    for s in plan.shards:
        if s.id in written:
            rows, failed = written[s.id]
        elif s.id in work.entries:
            rows, failed = work.entries[s.id]["rows"], work.entries[s.id]["failed"]
        else:
            rows, failed = s.rows, -1  # not written yet, or by a run that was killed
        out.append(_entry(s, rows, failed))
    # Files of the plan are `current` (written or not); the others stay listed until deleted.
    out += [{**work.entries[i], "state": "superseded"} for i in work.superseded if i in work.entries and i not in gone]
    out += [{**work.entries[i], "state": "kept"} for i in work.kept if i in work.entries]
    return out


def finish(cfg: Config, plan: Plan, output: str, work: Work, written: dict[str, tuple[int, int]]) -> dict[str, int]:
    """After the run: delete the old files whose every replacement is written (and, once every
    shard is done, the legacy ones); write the index. Returns counts of what was deleted."""
    finished = {s.id for s in work.done} | set(written) | work.retry_ids
    gone = {i for i, by in work.superseded.items() if all(b in finished for b in by)}
    complete = all(s.id in finished for s in plan.shards)
    legacy = set(work.legacy) if complete else set()
    fs, path = storage.filesystem(output, cfg.storage)

    def delete(shard_id: str) -> None:
        target = f"{path.rstrip('/')}/{output_name(shard_id)}"
        try:
            storage.retrying(lambda: fs.delete_file(target), f"deleting {output_name(shard_id)}", cfg.storage)
        except FileNotFoundError:  # deleted by a run that was stopped after its deletions
            pass

    list(ThreadPoolExecutor(16).map(delete, sorted(gone | legacy)))
    write_index(output, cfg.storage, _entries(plan, work, written, gone), work.meta)
    return {
        "replaced": len([i for i in gone if work.superseded[i]]),
        "pruned": len([i for i in gone if not work.superseded[i]]),
        "legacy_removed": len(legacy),
    }
