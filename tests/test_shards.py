"""Unit tests of an output folder against a plan (capray/shards.py), without Ray: which files are
done, which a changed input superseded and which new shards replace them, removed inputs pruned
or kept, outputs of an earlier capray, other settings refused, and training refusing a features
folder that an unfinished extraction is still replacing."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray import shards
from capray.config import load_config
from capray.featurestore import FeatureError, verify
from capray.inputs import InputError, Plan, Shard


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"work_dir={tmp_path}/work", *overrides])


def _listing_plan(bounds: list[str], tag: str) -> Plan:
    """Listing shards with key ranges cut at `bounds` (the first range open below)."""
    los = ["", *bounds]
    his = [*bounds, ""]
    return Plan(
        "files",
        [
            Shard(f"list-{i}{tag}.{tag}{i:011d}", "listing", f"chunk-{i}", rows=1, lo=lo, hi=hi)
            for i, (lo, hi) in enumerate(zip(los, his))
        ],
        "in",
    )


def _write(out: Path, shard_id: str) -> None:
    out.mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"image": [shard_id], "error": pa.nulls(1, pa.string())}), out / shards.output_name(shard_id)
    )


def test_changed_ranges_replace_the_old_files_they_overlap_once_written(tmp_path: Path) -> None:
    cfg, out = _cfg(tmp_path), tmp_path / "out"
    old = _listing_plan(["d", "m"], "a")
    shards.reconcile(cfg, old, str(out), {"k": 1})
    for s in old.shards:
        _write(out, s.id)
    shards.finish(cfg, old, str(out), shards.reconcile(cfg, old, str(out), {"k": 1}), {})
    # The input changed: the ranges are now cut at "f"; the first old range is unchanged.
    new = Plan("files", [old.shards[0], *_listing_plan(["d", "f"], "b").shards[1:]], "in")
    work = shards.reconcile(cfg, new, str(out), {"k": 1})
    assert [s.id for s in work.done] == [old.shards[0].id]
    sources = {s.id: s.sources for s in work.todo}
    assert sources[new.shards[1].id] == (shards.output_name(old.shards[1].id),)  # [d, f) overlaps [d, m)
    assert set(sources[new.shards[2].id]) == {
        shards.output_name(old.shards[1].id),
        shards.output_name(old.shards[2].id),
    }
    assert work.superseded[old.shards[1].id] == [new.shards[1].id, new.shards[2].id]
    # An unfinished run replaced nothing yet: training would read the old and the new files.
    _write(out, new.shards[1].id)
    shards.finish(cfg, new, str(out), work, {new.shards[1].id: (1, 0)})
    assert shards.done_ids(str(out)) == {old.shards[0].id, old.shards[1].id, old.shards[2].id, new.shards[1].id}
    with pytest.raises(FeatureError, match="unfinished `capray extract` is replacing 2 shard files"):
        verify(str(out))
    # The next run writes the rest; every old file is gone and the index lists the plan only.
    work = shards.reconcile(cfg, new, str(out), {"k": 1})
    assert [s.id for s in work.todo] == [new.shards[2].id]
    _write(out, new.shards[2].id)
    assert shards.finish(cfg, new, str(out), work, {new.shards[2].id: (1, 0)})["replaced"] == 2
    assert shards.done_ids(str(out)) == {s.id for s in new.shards}
    assert {e["id"]: e["state"] for e in shards.read_index(str(out), None)[0]} == {s.id: "current" for s in new.shards}
    verify(str(out))


def test_files_of_removed_inputs_are_pruned_or_kept_and_earlier_outputs_redone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = Shard("a-1.aaaaaaaaaaaa", "csv", "a.csv", source="a.csv")
    b = Shard("b-1.bbbbbbbbbbbb", "csv", "b.csv", source="b.csv")
    both = Plan("manifest", [a, b], "manifests")
    cfg = _cfg(tmp_path)
    work = shards.reconcile(cfg, both, str(out), {})
    _write(out, a.id)
    _write(out, b.id)
    shards.finish(cfg, both, str(out), work, {a.id: (1, 0), b.id: (1, 0)})
    only_a = Plan("manifest", [a], "manifests")
    kept = shards.reconcile(_cfg(tmp_path, "inputs.removed=keep"), only_a, str(out), {})
    assert kept.kept == [b.id] and not kept.todo
    pruned = shards.reconcile(cfg, only_a, str(out), {})
    assert pruned.superseded == {b.id: []}
    shards.finish(cfg, only_a, str(out), pruned, {})
    assert shards.done_ids(str(out)) == {a.id}
    # A file of capray before content-bound shards: not done, deleted once every shard is written.
    _write(out, "list-00000-00000-abcdef1234")
    work = shards.reconcile(cfg, only_a, str(out), {})
    assert work.legacy == ["list-00000-00000-abcdef1234"]
    shards.finish(cfg, only_a, str(out), work, {})
    assert shards.done_ids(str(out)) == {a.id}
    # Anybody else's Parquet file in the output folder: refused, never deleted as a legacy one.
    pq.write_table(pa.table({"id": [1], "price": [2.0]}), out / "sales.parquet")
    with pytest.raises(
        InputError, match=r"holds 1 Parquet file\(s\) that capray did not write \(e\.g\. sales\.parquet"
    ):
        shards.reconcile(cfg, only_a, str(out), {})
    assert (out / "sales.parquet").exists()


def test_other_settings_or_another_input_are_refused_naming_the_difference(tmp_path: Path) -> None:
    cfg, out = _cfg(tmp_path), str(tmp_path / "out")
    plan = _listing_plan([], "a")
    shards.reconcile(cfg, plan, out, {"caption.strategy": "greedy", "checkpoint": "c1"})
    with pytest.raises(shards.OutputMismatchError, match="caption.strategy: greedy -> beam; checkpoint: c1 -> c2"):
        shards.reconcile(cfg, plan, out, {"caption.strategy": "beam", "checkpoint": "c2"})
    with pytest.raises(shards.OutputMismatchError, match="holds the output of input in, not elsewhere"):
        shards.reconcile(
            cfg, Plan("files", plan.shards, "elsewhere"), out, {"caption.strategy": "greedy", "checkpoint": "c1"}
        )


def test_an_output_recorded_under_old_key_names_is_the_same_settings(tmp_path: Path) -> None:
    cfg, out = _cfg(tmp_path), str(tmp_path / "out")
    plan = _listing_plan([], "a")
    # What capray wrote before `infer` and `encoder` became `caption` and `backbone`.
    shards.reconcile(cfg, plan, out, {"infer.strategy": "greedy", "encoder.weights": "random"})
    shards.reconcile(cfg, plan, out, {"caption.strategy": "greedy", "backbone.weights": "random"})
    with pytest.raises(shards.OutputMismatchError, match="backbone.weights: random -> imagenet"):
        shards.reconcile(cfg, plan, out, {"caption.strategy": "greedy", "backbone.weights": "imagenet"})


def test_failed_rows_are_retried_on_request_from_the_files_own_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = _listing_plan(["m"], "a")
    cfg = _cfg(tmp_path)
    work = shards.reconcile(cfg, plan, str(out), {})
    for s in plan.shards:
        _write(out, s.id)
    shards.finish(cfg, plan, str(out), work, {plan.shards[0].id: (5, 0), plan.shards[1].id: (5, 2)})
    again = shards.reconcile(_cfg(tmp_path, "inputs.retry_failed=true"), plan, str(out), {})
    assert [(s.id, s.sources) for s in again.todo] == [(plan.shards[1].id, (shards.output_name(plan.shards[1].id),))]
    assert [s.id for s in again.done] == [plan.shards[0].id]


def test_overwrite_deletes_an_output_folder_only_when_it_holds_nothing_but_capray_output(tmp_path: Path) -> None:
    photos, work, out = tmp_path / "photos", tmp_path / "work", tmp_path / "out"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"a")
    (work / "runs/r/best").mkdir(parents=True)
    keeps = {"caption.input": str(photos / "sub"), "work_dir": str(work), "checkpoint": str(work / "runs/r/best")}

    def refused(output: Path, keep: dict[str, str], message: str) -> None:
        with pytest.raises(InputError, match=message):
            shards.clear(str(output), keep, None, "caption.overwrite")
        assert output.is_dir()  # nothing deleted

    # `caption.input=photos output=photos --overwrite` deleted the photos.
    refused(photos / "sub", keeps, r"caption.overwrite=true would delete .*sub, which is or holds the caption.input")
    refused(photos, keeps, "which is or holds the caption.input")
    refused(tmp_path, {"work_dir": str(work)}, "which is or holds the work_dir")
    refused(work / "runs", {"checkpoint": keeps["checkpoint"]}, "which is or holds the checkpoint")
    refused(photos, {}, r"holds more than capray's output \(2 other entries, e\.g\. .*a\.jpg\)")
    assert (photos / "a.jpg").read_bytes() == b"a"

    # What capray writes there: shard files, its index, `_status/`, its config; hidden files.
    (out / "_status").mkdir(parents=True)
    for name in ("list-0123.abcd.parquet", "_shards.parquet", "_capray_config.yaml", ".DS_Store"):
        (out / name).write_bytes(b"x")
    shards.write_index(
        str(out), None, [], {"format": shards.FORMAT, "input": "in", "settings": {"extract.dtype": "float16"}}
    )
    refused(out, keeps, "caption.overwrite=true would delete .*out, which holds the extract job's output")
    shards.clear(str(out), keeps, None, "extract.overwrite")
    assert not out.exists()
    (out / "_status").mkdir(parents=True)
    shards.write_index(
        str(out), None, [], {"format": shards.FORMAT, "input": "in", "settings": {"caption.strategy": "greedy"}}
    )
    shards.clear(str(out), keeps, None, "caption.overwrite")
    assert not out.exists()
    shards.clear(str(out), keeps, None, "caption.overwrite")  # nothing to delete
