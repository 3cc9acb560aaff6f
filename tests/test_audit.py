"""`capray audit`: a job's output folder checked against its input, key by key, on local Ray, on
local paths and on a real S3-protocol server; output files are written here with pyarrow (the jobs
that write them have their own tests), problems planted in them and found by name."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagezoo import good_images

from capray import audit, cli, inputs, storage
from capray.config import load_config, output_paths
from capray.inputs import InputError

STALE = "s3://elsewhere/gone.jpg"


def _write_output(uri: str, rows: list[tuple[str, str | None]], storage_cfg, features: bool = False) -> None:
    """One output file as the jobs write it: image, caption, error (+ a features column)."""
    columns = {
        "image": pa.array([k for k, _ in rows], pa.string()),
        "caption": pa.array([None if e else "a caption" for _, e in rows], pa.string()),
        "error": pa.array([e for _, e in rows], pa.string()),
    }
    if features:  # the extract job's files: a large binary column the audit must not need
        columns["features"] = pa.array([None if e else b"\0" * 4096 for _, e in rows], pa.binary())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_cfg)


def _metadata(output: str, storage_cfg) -> None:
    """What sits next to the data files and is not data: never read as output rows."""
    storage.write_bytes(storage.join(output, "_capray_config.yaml"), b"name: x\n", storage_cfg)
    storage.write_bytes(storage.join(output, "_files.json"), b"{}", storage_cfg)
    _write_output(storage.join(output, "_shards.parquet"), [(STALE, None)], storage_cfg)


def _kind(report_dir: str, kind: str, storage_cfg) -> pa.Table:
    fs, path = storage.filesystem(storage.join(report_dir, kind), storage_cfg)
    return pq.read_table(path, filesystem=fs)


def _keys(report_dir: str, kind: str, storage_cfg) -> set[str]:
    return set(_kind(report_dir, kind, storage_cfg)["image"].to_pylist())


def _clean_then_planted(cfg, plan: inputs.Plan, keys: list[str], output: str, features_output: bool = False) -> None:
    """A clean output audits clean; then a missing, a duplicated, a stale and a failed key are
    planted and each is found, by name, in its part of the (replaced) report."""
    sc = cfg.storage
    half = len(keys) // 2
    _write_output(storage.join(output, "shard-a.parquet"), [(k, None) for k in keys[:half]], sc)
    _write_output(storage.join(output, "shard-b.parquet"), [(k, None) for k in keys[half:]], sc, features_output)
    _metadata(output, sc)
    s = audit.audit(cfg, plan, output)
    report = storage.join(output, "_audit")
    assert s["report_dir"] == report
    assert (s["input_images"], s["ok"], s["failed"], s["missing"], s["duplicated"], s["stale"]) == (
        len(keys),
        len(keys),
        0,
        0,
        0,
        0,
    )
    assert s["output_rows"] == len(keys) and s["output_files"] == 2
    for kind in audit.KINDS:  # every kind's folder exists and reads, empty
        assert _kind(report, kind, sc).num_rows == 0
    line = audit.verdict(s)
    assert line.startswith(f"audit: {len(keys)} images") and line.endswith(
        f": {len(keys)} ok, 0 failed, 0 missing, 0 duplicated, 0 stale -> {report}"
    )
    storage.write_bytes(storage.join(report, "left-over.txt"), b"from an earlier audit", sc)

    missing, duplicated, failed = keys[0], keys[1], keys[-1]
    _write_output(storage.join(output, "shard-a.parquet"), [(k, None) for k in keys[1:half]], sc)
    _write_output(
        storage.join(output, "shard-b.parquet"),
        [(k, "cannot decode" if k == failed else None) for k in keys[half:]] + [(duplicated, None), (STALE, None)],
        sc,
        features_output,
    )
    s = audit.audit(cfg, plan, output)
    assert (s["ok"], s["failed"], s["missing"], s["duplicated"], s["stale"]) == (len(keys) - 3, 1, 1, 1, 1)
    assert s["output_rows"] == len(keys) + 1 and s["stale_rows"] == 1
    assert _keys(report, "missing", sc) == {missing}
    assert _kind(report, "duplicated", sc).to_pylist() == [{"image": duplicated, "rows": 2}]
    assert _kind(report, "stale", sc).to_pylist() == [{"image": STALE, "rows": 1}]
    assert _kind(report, "failed", sc).to_pylist() == [{"image": failed, "error": "cannot decode"}]
    assert not storage.exists(storage.join(report, "left-over.txt"), sc)  # the previous report is replaced
    saved = json.loads(storage.read_bytes(storage.join(report, "report.json"), sc))
    assert (saved["missing"], saved["duplicated"], saved["output"]) == (1, 1, output)
    assert saved["examples"]["missing"] == [missing] and saved["time"]


def _image_folder(folder: Path) -> list[str]:
    for name, data in good_images().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def test_audit_local_folder_caption_and_features_outputs(tmp_path: Path, ray_local) -> None:
    keys = _image_folder(tmp_path / "images")
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}"])
    plan = inputs.plan(cfg, str(tmp_path / "images"), output_paths(cfg)["inputs"])
    _clean_then_planted(cfg, plan, keys, str(tmp_path / "captions"))
    # A report folder of the caller's replaces an earlier report only, never other files.
    with pytest.raises(InputError, match=r"images holds more than an audit report \(e\.g\. "):
        audit.audit(cfg, plan, str(tmp_path / "captions"), report_dir=str(tmp_path / "images"))
    assert sorted(str(p) for p in (tmp_path / "images").rglob("*") if p.is_file()) == keys
    # The extract job's files: the same keys, a features column that the audit does not read.
    _clean_then_planted(cfg, plan, keys, str(tmp_path / "features"), features_output=True)


def test_audit_on_s3_with_a_manifest_listing_a_key_twice(s3, ray_local) -> None:
    bucket = s3.bucket("audit")
    cfg = s3.config(f"work_dir={bucket}/work")
    keys = [f"{bucket}/images/{name}" for name in sorted(good_images())]
    for key, data in zip(keys, (good_images()[k] for k in sorted(good_images()))):
        storage.write_bytes(key, data, cfg.storage)
    manifest = f"{bucket}/manifest.csv"
    storage.write_bytes(manifest, ("image\n" + "\n".join([*keys, keys[2]]) + "\n").encode(), cfg.storage)
    plan = inputs.plan(cfg, manifest, output_paths(cfg)["inputs"])
    _clean_then_planted(cfg, plan, keys, f"{bucket}/captions")
    s = audit.audit(cfg, plan, f"{bucket}/captions", report_dir=f"{bucket}/reports/audit-1")
    assert s["repeated_in_input"] == 1 and s["input_rows"] == len(keys) + 1 and s["input_images"] == len(keys)
    assert "(1 listed more than once in the input)" in audit.verdict(s)
    assert storage.exists(f"{bucket}/reports/audit-1/report.json", cfg.storage)


def test_capray_audit_command(tmp_path: Path, ray_local, capsys: pytest.CaptureFixture) -> None:
    keys = _image_folder(tmp_path / "images")
    out = tmp_path / "captions"
    args = ["audit", f"work_dir={tmp_path / 'work'}", f"caption.input={tmp_path / 'images'}", f"output={out}"]
    # Checked before Ray is needed: the output folder must be there.
    assert cli.main(args) == 3
    assert f"capray audit: InputError: output folder not found: {out}" in capsys.readouterr().err

    _write_output(str(out / "shard-a.parquet"), [(k, None) for k in keys], None)
    assert cli.main(args) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("[capray] audit: ") and " ok, " in line
    ]
    assert lines == [
        f"[capray] audit: {len(keys)} images: {len(keys)} ok, 0 failed, 0 missing, 0 duplicated, 0 stale -> {out / '_audit'}"
    ]

    _write_output(str(out / "shard-a.parquet"), [(k, None) for k in keys[1:]], None)
    assert cli.main(args) == 10
    captured = capsys.readouterr()
    assert (
        f"[capray] audit: {len(keys)} images: {len(keys) - 1} ok, 0 failed, 1 missing, 0 duplicated, 0 stale"
        in captured.out
    )
    assert f"capray audit: AuditError: 1 missing and 0 duplicated of {len(keys)} images" in captured.err
    assert _keys(str(out / "_audit"), "missing", None) == {keys[0]}
