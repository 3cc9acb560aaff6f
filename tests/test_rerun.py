"""System tests: re-runs after the input changed (issue 24). Images added among the old names,
removed and overwritten in a folder or S3 prefix; a manifest and a tar rewritten under the same
name; other settings or another input into the same output; outputs of an earlier capray; failed
rows retried. After every re-run each current image has exactly one row and only the new or
changed images went through the model."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagezoo import tar_shard
from PIL import Image

from capray import extraction, shards, storage
from capray.captioning import caption
from capray.shards import OutputMismatchError


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: str, ray_local) -> str:
    return tiny_checkpoint


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class Folder:
    """A folder of images on local disk or on the S3 server, changed between runs."""

    def __init__(self, root: str, cfg) -> None:
        self.root, self.cfg = root, cfg

    def put(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.root, name), data, self.cfg.storage)

    def delete(self, name: str) -> None:
        fs, path = storage.filesystem(storage.join(self.root, name), self.cfg.storage)
        fs.delete_file(path)

    def uri(self, name: str) -> str:
        return storage.join(self.root, name)


def _rows(cfg, out: str) -> pd.DataFrame:
    """Every row of every shard file of an output folder."""
    names = sorted(shards.done_ids(out, cfg.storage))
    tables = []
    for name in names:
        fs, path = storage.filesystem(storage.join(out, shards.output_name(name)), cfg.storage)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f).to_pandas())
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["image"])


def _exactly_once(cfg, out: str, expected: set[str]) -> pd.DataFrame:
    rows = _rows(cfg, out)
    assert rows["image"].is_unique, rows["image"][rows["image"].duplicated()].tolist()
    assert set(rows["image"]) == expected
    return rows


def _audit(cfg, input_uri: str, out: str) -> dict:
    """`capray audit` of the output against the input as the last run listed it."""
    from omegaconf import OmegaConf

    from capray import audit, inputs
    from capray.config import output_paths

    cfg = OmegaConf.merge(cfg, {"inputs": {"relist": False}})
    return audit.audit(cfg, inputs.plan(cfg, input_uri, output_paths(cfg)["inputs"]), out)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_images_added_among_old_names_removed_and_overwritten(
    where: str, tmp_path: Path, s3, checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="capray")
    if where == "s3":
        bucket = s3.bucket("rerun-folder")
        cfg = s3.config(f"work_dir={bucket}/work", "inputs.shard_rows=6", "caption.batch_size=8")
        root, out = f"{bucket}/photos", f"{bucket}/captions"
    else:
        from capray.config import load_config

        cfg = load_config(None, [f"work_dir={tmp_path}/work", "inputs.shard_rows=6", "caption.batch_size=8"])
        root, out = str(tmp_path / "photos"), str(tmp_path / "captions")
    photos = Folder(root, cfg)
    for i in range(0, 60, 2):  # 30 images with even numbers
        photos.put(f"img_{i:03d}.jpg", _jpeg(i))
    first = caption(cfg, checkpoint, root, out)
    assert first["computed"] == 30 and first["copied"] == 0
    _exactly_once(cfg, out, {photos.uri(f"img_{i:03d}.jpg") for i in range(0, 60, 2)})

    # The scenario: new names sort among the old ones; plus removals and overwrites.
    for i in range(1, 20, 2):
        photos.put(f"img_{i:03d}.jpg", _jpeg(i))
    for i in (40, 42, 44):
        photos.delete(f"img_{i:03d}.jpg")
    for i in (10, 20):
        photos.put(f"img_{i:03d}.jpg", _jpeg(1000 + i))
    current = {photos.uri(f"img_{i:03d}.jpg") for i in [*range(0, 60, 2), *range(1, 20, 2)] if i not in (40, 42, 44)}

    # Reusing the saved listing sees none of it, and says which listing it used.
    caplog.clear()
    cfg.inputs.relist = False
    stale = caption(cfg, checkpoint, root, out)
    assert stale["shards_written"] == 0
    assert "using the saved listing of" in caplog.text
    cfg.inputs.relist = True

    caplog.clear()
    second = caption(cfg, checkpoint, root, out)
    said = caplog.text
    assert "10 new, 2 changed, 3 removed, 25 unchanged images" in said, said
    assert second["computed"] == 12, second  # the 10 new and the 2 overwritten, nothing else
    rows = _exactly_once(cfg, out, current)
    report = _audit(cfg, root, out)
    assert (report["input_images"], report["missing"], report["duplicated"], report["stale"]) == (37, 0, 0, 0)
    versions = dict(zip(rows["image"], rows["image_version"]))
    for i in (10, 20):  # the overwritten images' rows are of their new bytes
        assert versions[photos.uri(f"img_{i:03d}.jpg")].startswith(f"{len(_jpeg(1000 + i))}:")
    # No file of the old shards is left: exactly the plan's files, and the index says so.
    entries, meta = shards.read_index(out, cfg.storage)
    assert {e["id"] for e in entries} == shards.done_ids(out, cfg.storage) and meta["input"] == root

    caplog.clear()
    third = caption(cfg, checkpoint, root, out)
    assert third["shards_written"] == 0 and "0 new, 0 changed, 0 removed" in caplog.text


def test_removed_images_kept_on_request_and_a_partial_rerun_then_a_full_one(tmp_path: Path, checkpoint: str) -> None:
    from capray.config import load_config

    cfg = load_config(None, [f"work_dir={tmp_path}/work", "inputs.shard_rows=4", "caption.batch_size=8"])
    root, out = str(tmp_path / "photos"), str(tmp_path / "captions")
    photos = Folder(root, cfg)
    names = [f"p{i:02d}.jpg" for i in range(20)]
    for i, n in enumerate(names):
        photos.put(n, _jpeg(i))
    caption(cfg, checkpoint, root, out)
    photos.delete("p03.jpg")
    photos.delete("p11.jpg")
    cfg.inputs.removed = "keep"
    kept = caption(cfg, checkpoint, root, out)
    assert kept["computed"] == 0
    _exactly_once(cfg, out, {photos.uri(n) for n in names})  # the removed images' rows are still there
    report = _audit(cfg, root, out)
    assert (report["missing"], report["duplicated"], report["stale"]) == (0, 0, 2)

    # Changes all over the key order, then a run of one shard only: the old files that the rest
    # of the shards replace stay until those are written; a full re-run leaves each image once.
    cfg.inputs.removed = "prune"
    for i in range(20, 40):
        photos.put(f"p{i:02d}.jpg", _jpeg(i))
    for i in range(0, 20, 3):
        photos.put(f"p{i:02d}x.jpg", _jpeg(100 + i))
    cfg.inputs.limit_shards = 1
    partial = caption(cfg, checkpoint, root, out)
    assert partial["shards_written"] == 1 and partial["remaining_shards"] > 0
    present = shards.done_ids(out, cfg.storage)
    assert {e["id"] for e in shards.read_index(out, cfg.storage)[0]} >= present  # every file is in the index
    cfg.inputs.limit_shards = 0
    full = caption(cfg, checkpoint, root, out)
    current = {photos.uri(n) for n in names if n not in ("p03.jpg", "p11.jpg")}
    current |= {photos.uri(f"p{i:02d}.jpg") for i in range(20, 40)} | {
        photos.uri(f"p{i:02d}x.jpg") for i in range(0, 20, 3)
    }
    _exactly_once(cfg, out, current)
    assert partial["computed"] + full["computed"] == 27  # 20 + 7 new images, each computed once
    report = _audit(cfg, root, out)
    assert (report["input_images"], report["missing"], report["duplicated"], report["stale"]) == (len(current), 0, 0, 0)


def test_manifest_and_tar_rewritten_under_the_same_name(s3, checkpoint: str) -> None:
    bucket = s3.bucket("rerun-files")
    cfg = s3.config(f"work_dir={bucket}/work", "caption.batch_size=8")
    photos = Folder(f"{bucket}/img", cfg)
    for i in range(14):
        photos.put(f"m{i:02d}.jpg", _jpeg(200 + i))
    manifest = f"{bucket}/list.csv"

    def write_manifest(ids: range, tag: str) -> None:
        body = "image,id\n" + "".join(f"img/m{i:02d}.jpg,{tag}{i}\n" for i in ids)
        storage.write_bytes(manifest, body.encode(), cfg.storage)

    write_manifest(range(0, 6), "a")
    out = f"{bucket}/captions"
    caption(cfg, checkpoint, manifest, out)
    write_manifest(range(2, 14), "b")  # 2 removed, 8 added, 4 with changed columns
    again = caption(cfg, checkpoint, manifest, out)
    assert again["computed"] == 12  # a rewritten manifest is redone as a whole
    rows = _exactly_once(cfg, s3_out := out, {photos.uri(f"m{i:02d}.jpg") for i in range(2, 14)})
    assert sorted(rows["id"]) == sorted(f"b{i}" for i in range(2, 14))  # no row of the old version
    report = _audit(cfg, manifest, out)
    assert (report["input_images"], report["missing"], report["duplicated"], report["stale"]) == (12, 0, 0, 0)

    # A tar overwritten in place.
    tar = f"{bucket}/wds/00000.tar"
    storage.write_bytes(tar, tar_shard({"a": _jpeg(1), "b": _jpeg(2), "c": _jpeg(3)}), cfg.storage)
    tars_out = f"{bucket}/tar-captions"
    caption(cfg, checkpoint, f"{bucket}/wds", tars_out)
    storage.write_bytes(tar, tar_shard({"a": _jpeg(1), "d": _jpeg(4)}), cfg.storage)
    caption(cfg, checkpoint, f"{bucket}/wds", tars_out)
    _exactly_once(cfg, tars_out, {"00000/a", "00000/d"})
    report = _audit(cfg, f"{bucket}/wds", tars_out)
    assert (report["ok"], report["missing"], report["duplicated"], report["stale"]) == (2, 0, 0, 0)

    # Other settings or another input into the same output: refused, naming what differs.
    cfg.caption.strategy = "beam"
    with pytest.raises(OutputMismatchError, match="caption.strategy: greedy -> beam"):
        caption(cfg, checkpoint, manifest, s3_out)
    cfg.caption.overwrite = True
    redone = caption(cfg, checkpoint, manifest, s3_out)
    assert redone["computed"] == 12 and set(_rows(cfg, s3_out)["strategy"]) == {"beam3"}
    cfg.caption.overwrite, cfg.caption.strategy = False, "greedy"
    with pytest.raises(OutputMismatchError, match="holds the output of input"):
        caption(cfg, checkpoint, f"{bucket}/wds", s3_out)


def test_outputs_of_an_earlier_capray_are_redone_and_failed_rows_retried(tmp_path: Path, checkpoint: str) -> None:
    from capray.config import load_config

    cfg = load_config(None, [f"work_dir={tmp_path}/work", "caption.batch_size=8"])
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"r{i}.jpg").write_bytes(_jpeg(300 + i))
    images = [str(tmp_path / "img" / f"r{i}.jpg") for i in range(6)]  # r5.jpg does not exist yet
    pd.DataFrame({"image": images}).to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "captions"
    out.mkdir()
    # A file as capray wrote them before content-bound shards: a positional id, no index.
    pd.DataFrame({"image": images, "caption": ["old"] * 6, "error": [None] * 6}).to_parquet(
        out / "list-a1b2c3d4e5.parquet"
    )
    first = caption(cfg, checkpoint, str(tmp_path / "list.csv"), str(out))
    assert first["computed"] == 6 and first["failed"] == 1
    rows = _exactly_once(cfg, str(out), set(images))
    assert "old" not in set(rows["caption"]) and not (out / "list-a1b2c3d4e5.parquet").exists()

    # The missing image appears (a storage outage over): a plain re-run has nothing to do, one
    # with inputs.retry_failed redoes that row only.
    (tmp_path / "img" / "r5.jpg").write_bytes(_jpeg(305))
    assert caption(cfg, checkpoint, str(tmp_path / "list.csv"), str(out))["shards_written"] == 0
    cfg.inputs.retry_failed = True
    retried = caption(cfg, checkpoint, str(tmp_path / "list.csv"), str(out))
    assert retried["computed"] == 1 and retried["copied"] == 5 and retried["failed"] == 0
    assert _exactly_once(cfg, str(out), set(images))["error"].isna().all()


def test_extraction_of_a_growing_dataset_extracts_the_new_images_only(tmp_path: Path, ray_local) -> None:
    from capray.config import load_config

    cfg = load_config(
        None,
        [
            f"work_dir={tmp_path}/work",
            "backbone.weights=random",
            "inputs.shard_rows=4",
            f"extract.input={tmp_path}/img",
        ],
    )
    (tmp_path / "img").mkdir()
    for i in range(0, 16, 2):
        (tmp_path / "img" / f"e{i:02d}.jpg").write_bytes(_jpeg(400 + i))
    out = str(tmp_path / "work" / "features")
    extraction.extract(cfg, extraction.job_plan(cfg), out)
    for i in range(1, 8, 2):
        (tmp_path / "img" / f"e{i:02d}.jpg").write_bytes(_jpeg(400 + i))
    grown = extraction.extract(cfg, extraction.job_plan(cfg), out)
    assert grown["computed"] == 4  # the other images are copied or in shards that did not change
    rows = _exactly_once(
        cfg, out, {str(tmp_path / "img" / f"e{i:02d}.jpg") for i in [*range(0, 16, 2), *range(1, 8, 2)]}
    )
    assert (rows["features"].str.len() == 64 * 2048 * 2).all()
    file_list = extraction.read_file_list(out, cfg.storage)
    assert file_list["rows"] == 12 and {f["file"] for f in file_list["files"]} == {
        shards.output_name(i) for i in shards.done_ids(out, None)
    }
