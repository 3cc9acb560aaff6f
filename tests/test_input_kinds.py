"""System tests: each input kind (prefix, manifest, manifest folder, WebDataset tars, Parquet with
image bytes) through both image jobs, from a real S3-protocol server on local Ray; a prefix also
from Google Cloud Storage and Azure Blob emulators (the whole matrix on S3 only: CI's time)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images, tar_shard

from capray import extraction, featurestore, inputs, pipeline, reader, storage
from capray.captioning import caption
from capray.config import load_config, output_paths
from capray.images import error_class
from capray.inputs import InputError
from capray.status import read_status

GOOD = ["scene.jpg", "gray.jpg", "alpha.png", "cmyk.jpg"]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


Kinds = dict[str, tuple[str, dict[str, str | None], list[str]]]


@pytest.fixture(scope="module")
def kinds(request: pytest.FixtureRequest) -> Callable[[str], Kinds]:
    """store -> kind -> (input URI, {row key: expected error fragment or None}, pass-through
    columns); each store's inputs are written once, when a test first asks for them."""
    built: dict[str, Kinds] = {}

    def on(store: str) -> Kinds:
        if store not in built:
            built[store] = _put_kinds(request.getfixturevalue(store))
        return built[store]

    return on


def _put_kinds(server) -> Kinds:
    bucket, cfg = server.bucket("kinds"), server.config()
    put = lambda key, data: storage.write_bytes(f"{bucket}/{key}", data, cfg.storage)
    imgs = good_images()
    for name in GOOD:
        put(f"img/{name}", imgs[name])
    put("img/sub/notes.jpg", bad_images()["notes.jpg"][0])
    in_prefix = {f"{bucket}/img/{n}": None for n in GOOD} | {f"{bucket}/img/sub/notes.jpg": "cannot decode"}

    manifest = pd.DataFrame(
        {
            "image": [f"img/{n}" for n in GOOD] + ["img/missing.jpg", ""],
            "id": ["1", "2", "3", "4", "5", "6"],
            "licence": ["cc-by"] * 6,
        }
    )
    put("one.csv", manifest.to_csv(index=False).encode())
    # A blank image field is an error row of its own, not a read of the bucket's root.
    one = {f"{bucket}/img/{n}": None for n in GOOD} | {
        f"{bucket}/img/missing.jpg": "cannot read file",
        "": "empty image path/URI",
    }
    # A folder of manifests: Parquet and CSV side by side, absolute URIs.
    put(
        "manifests/a.parquet",
        _parquet_bytes(pa.table({"image": [f"{bucket}/img/{n}" for n in GOOD[:2]], "id": ["a", "b"]})),
    )
    put("manifests/b.csv", f"image,id\n{bucket}/img/{GOOD[2]},c\n{bucket}/img/{GOOD[3]},d\n".encode())
    folder = {f"{bucket}/img/{n}": None for n in GOOD}

    put("wds/00000.tar", tar_shard({"a": imgs["scene.jpg"], "b": imgs["gray.jpg"]}))
    whole = tar_shard({"c": imgs["cmyk.jpg"], "d": imgs["alpha.png"], "e": imgs["scene.jpg"]})
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmember("e.jpg").offset_data + 100
    put("wds/00001.tar", whole[:cut])
    put(
        "wds/00000.parquet", _parquet_bytes(pa.table({"key": ["a"]}))
    )  # img2dataset's metadata beside the tars: ignored
    tars = {"00000/a": None, "00000/b": None, "00001/c": None, "00001/d": None, "00001/e": "truncated or corrupt tar"}

    put(
        "laion/00000.parquet",
        _parquet_bytes(
            pa.table(
                {
                    "key": ["k0", "k1", "k2"],
                    "jpg": [imgs["scene.jpg"], imgs["gray.jpg"], b"junk"],
                    "url": ["http://u/0", "http://u/1", "http://u/2"],
                }
            )
        ),
    )
    laion = {"k0": None, "k1": None, "k2": "cannot decode"}
    return {
        "prefix": (f"{bucket}/img", in_prefix, ["image_version"]),
        "manifest": (f"{bucket}/one.csv", one, ["id", "licence"]),
        "manifest_folder": (f"{bucket}/manifests", folder, ["id"]),
        "webdataset": (f"{bucket}/wds", tars, ["caption", "json"]),
        "parquet_bytes": (f"{bucket}/laion", laion, ["url"]),
    }


def _check(rows: pd.DataFrame, expected: dict[str, str | None]) -> None:
    assert sorted(rows["image"]) == sorted(expected) and rows["image"].is_unique
    by_key = rows.set_index("image")["error"]
    for key, fragment in expected.items():
        if fragment is None:
            assert pd.isna(by_key[key]), f"{key}: {by_key[key]}"
        else:
            assert fragment in by_key[key]


KINDS = ["prefix", "manifest", "manifest_folder", "webdataset", "parquet_bytes"]


@pytest.mark.parametrize(("store", "kind"), [("s3", k) for k in KINDS] + [("gcs", "prefix"), ("azure", "prefix")])
def test_every_input_kind_through_caption_and_extract(
    store: str, kind: str, kinds, request: pytest.FixtureRequest, tiny_checkpoint: str, ray_local
) -> None:
    uri, expected, passed = kinds(store)[kind]
    server = request.getfixturevalue(store)
    # work_dir on the store too: the listing, the plan and the features are written there.
    work = server.bucket("work-" + kind.replace("_", "-")) + "/run"
    cfg = server.config(
        f"work_dir={work}",
        f"data.max_pixels={TEST_MAX_PIXELS}",
        "caption.batch_size=2",
        "extract.batch_size=2",
        "backbone.weights=random",
        "inputs.shard_rows=2",
    )
    fs, _ = storage.filesystem(work, cfg.storage)

    out = f"{work}/captions"
    summary = caption(cfg, tiny_checkpoint, uri, out)
    rows = pq.ParquetDataset(storage.filesystem(out, cfg.storage)[1], filesystem=fs).read().to_pandas()
    _check(rows, expected)
    assert summary["written"] == len(expected) and summary["failed"] == sum(v is not None for v in expected.values())
    captioned = rows[rows["error"].isna()]
    assert captioned["caption"].notna().all() and (captioned["num_tokens"] >= 1).all()
    # The input's own columns follow; a name the job uses itself gets an `input_` prefix.
    renamed = ["input_caption" if c == "caption" else c for c in passed]
    assert list(rows.columns) == ["image", "caption", "log_prob", "num_tokens", "strategy", "model", "error", *renamed]
    if kind == "manifest":
        assert rows.set_index("image").loc[f"{uri.rsplit('/', 1)[0]}/img/cmyk.jpg", "id"] == "4"
    if kind == "webdataset":
        assert rows.set_index("image").loc["00000/b", "input_caption"] == "caption of b"

    cfg.extract.input = uri
    extracted = extraction.run(cfg)
    assert extracted["extracted"] == sum(v is None for v in expected.values())
    table = (
        pq.ParquetDataset(storage.filesystem(output_paths(cfg)["features"], cfg.storage)[1], filesystem=fs)
        .read()
        .to_pandas()
    )
    _check(table, expected)
    assert list(table.columns) == [*featurestore.SCHEMA.names, *passed]
    # Both jobs' per-shard stats, for every input kind: `capray status` counts each output's rows
    # and failures by class as the rows have them.
    for folder, table_ in ((out, rows), (output_paths(cfg)["features"], table)):
        s = read_status(folder, cfg.storage)
        assert s["shards"]["done"] == s["shards"]["total"] == s["shards"]["stats_rolled_up"] > 0, folder
        assert s["rows"]["done"] == len(table_) and s["job"]["state"] == "finished"
        assert s["errors"] == table_["error"].dropna().map(error_class).value_counts().to_dict()
    # Re-runs skip every shard: nothing is read again.
    assert caption(cfg, tiny_checkpoint, uri, out)["shards_written"] == 0
    assert extraction.run(cfg)["shards_written"] == 0


def test_missing_and_empty_inputs_fail_clearly(tmp_path: Path, ray_local) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(InputError, match="input not found: .*nothing-here"):
        inputs.plan(cfg, str(tmp_path / "nothing-here"), str(tmp_path / "inputs"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"no images under .*empty \(files ending in jpg.*\); other files: 1 \.txt$"):
        inputs.plan(cfg, str(tmp_path / "empty"), str(tmp_path / "inputs"))


def test_a_folder_is_listed_by_ray_tasks_and_the_saved_listing_reused_on_request(tmp_path: Path, ray_local) -> None:
    for d in ("x", "y/z", ""):
        (tmp_path / "img" / d).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (tmp_path / "img" / d / f"{i}.jpg").write_bytes(b"")
        (tmp_path / "img" / d / "2.txt").write_text("a caption beside its image, not an image")
    cfg = _cfg(tmp_path, "inputs.shard_rows=2")
    cache = str(tmp_path / "inputs")
    plan = inputs.plan(cfg, str(tmp_path / "img"), cache)
    listed = [u for s in plan.shards for u in pq.read_table(s.uri)["image"].to_pylist()]
    assert sorted(listed) == sorted(str(p) for p in (tmp_path / "img").rglob("*.jpg")) and len(listed) == 9
    assert max(s.rows for s in plan.shards) <= 4 and plan.rows == 9  # about shard_rows, at most twice
    # The files that are not images are counted, from the top level and the sub-folders' tasks alike.
    assert plan.listing["passed_over"] == {".txt": 3}
    assert "caption: passed over 3 other files, not images by inputs.extensions/inputs.glob: 3 .txt" in (
        pipeline.listing_lines("caption", plan)
    )
    (tmp_path / "img" / "late.jpg").write_bytes(b"")
    cfg.inputs.relist = False  # the saved listing: the new image is not seen
    again = inputs.plan(cfg, str(tmp_path / "img"), cache)
    assert [s.id for s in again.shards] == [s.id for s in plan.shards] and again.rows == 9 and again.listing["reused"]
    assert again.listing["passed_over"] == {".txt": 3}
    cfg.inputs.relist = True
    fresh = inputs.plan(cfg, str(tmp_path / "img"), cache)
    assert fresh.rows == 10 and fresh.listing["changes"] == {"new": 1, "changed": 0, "removed": 0, "unchanged": 9}


def test_the_jobs_own_folders_inside_the_input_are_left_out(tmp_path: Path, ray_local) -> None:
    # A work_dir and a caption output inside the input folder (as with caption.input=s3://bucket/
    # and work_dir=s3://bucket/capray): their PNG figures are no input images, their Parquet files
    # no manifests, at the top level and deeper.
    photos = tmp_path / "photos"
    for name in ("a.jpg", "sub/b.jpg", "sub/work/reports/attention.png", "captions/thumb.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")
    own = [str(photos / "captions"), str(photos / "sub" / "work")]
    cfg = load_config(None, [f"work_dir={own[1]}"])
    cache = str(photos / "sub" / "work" / "inputs")
    for relist in (True, False):  # taken, then the saved listing reused
        cfg.inputs.relist = relist
        plan = inputs.plan(cfg, str(photos), cache, own[0])
        listed = [u for s in plan.shards for u in pq.read_table(s.uri)["image"].to_pylist()]
        assert sorted(listed) == [str(photos / "a.jpg"), str(photos / "sub" / "b.jpg")], relist
        assert plan.left_out == own and plan.listing["reused"] is not relist
        assert plan.listing["passed_over"] == {}  # the listing files in work_dir are not counted either
        assert f"caption: left out of the input, as this job's own folders: {own[0]}, {own[1]}" in (
            pipeline.listing_lines("caption", plan)
        )

    # A folder of manifests holding the caption output (Parquet files with an `image` column).
    tables = tmp_path / "tables"
    (tables / "captions").mkdir(parents=True)
    pq.write_table(pa.table({"image": [str(photos / "a.jpg")]}), tables / "m.parquet")
    pq.write_table(
        pa.table({"image": [str(photos / "a.jpg")], "caption": ["a dog"]}), tables / "captions" / "s.parquet"
    )
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}"])
    cache = str(tmp_path / "work" / "inputs")
    plan = inputs.plan(cfg, str(tables), cache, str(tables / "captions"))
    assert [s.source for s in plan.shards] == [str(tables / "m.parquet")]
    assert plan.left_out == [str(tables / "captions")]
    # A manifest named on its own: nothing is listed, nothing left out.
    assert inputs.plan(cfg, str(tables / "m.parquet"), cache, str(tables / "captions")).left_out == []
    # The input folder itself as the output of captions it would read back, or as the work_dir.
    with pytest.raises(InputError, match=rf"^input {tables} is the job's output folder too: .*\({tables}/captions\)$"):
        inputs.plan(cfg, str(tables), cache, str(tables))
    with pytest.raises(InputError, match=rf"^input {photos} is the work_dir too: .*work_dir={photos}/capray\)$"):
        inputs.plan(load_config(None, [f"work_dir={photos}"]), str(photos), cache)


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [f"work_dir={tmp_path / 'work'}", *extra])


def test_a_large_csv_manifest_is_split_into_shards_once(tmp_path: Path, ray_local) -> None:
    rows = [f"img/{i:03d}.jpg,{i},licence {i}" for i in range(30)]
    (tmp_path / "big.csv").write_text("image,id,licence\n" + "\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, "inputs.shard_rows=4")  # 4 rows x 100 bytes: this 700-byte CSV is split
    cache = str(tmp_path / "inputs")
    plan = inputs.plan(cfg, str(tmp_path / "big.csv"), cache)
    assert [s.rows for s in plan.shards] == [4] * 7 + [2] and plan.rows == 30
    read = [t for s in plan.shards for t in reader.read_shard(s, cfg, 3)]
    table = pa.concat_tables(read)
    assert table["image"].to_pylist() == [str(tmp_path / "img" / f"{i:03d}.jpg") for i in range(30)]
    assert table["id"].to_pylist() == [str(i) for i in range(30)] and table["licence"][29].as_py() == "licence 29"
    # Split once: a re-plan reuses the split and its ids. A changed CSV is new work: new ids, so
    # none of its shards passes for "already done".
    split = sorted(Path(cache).iterdir())
    assert [s.id for s in inputs.plan(cfg, str(tmp_path / "big.csv"), cache).shards] == [s.id for s in plan.shards]
    assert sorted(Path(cache).iterdir()) == split
    (tmp_path / "big.csv").write_text("image,id,licence\n" + "\n".join(rows[:29]) + "\n")
    changed = inputs.plan(cfg, str(tmp_path / "big.csv"), cache)
    assert changed.rows == 29 and not {s.id for s in changed.shards} & {s.id for s in plan.shards}
    # Bytes that are not UTF-8 where only the splitting task reads them: its error, naming the file.
    (tmp_path / "latin.csv").write_bytes(b"image,id\n" + b"img/a.jpg,1\n" * 6000 + b"img/caf\xe9.jpg,x\n")
    with pytest.raises(InputError, match=r"latin\.csv: not a readable CSV file \(.*invalid UTF8"):
        inputs.plan(cfg, str(tmp_path / "latin.csv"), cache)


def test_the_cli_reports_a_bad_input_in_one_line(tiny_checkpoint: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "capray.cli",
        "caption",
        f"checkpoint={tiny_checkpoint}",
        f"work_dir={tmp_path}",
        f"caption.input={tmp_path / 'nonexistent_dir'}",
        "ray.local_cpus=1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3  # InputError (docs/cli.md)
    assert f"capray caption: InputError: input not found: {tmp_path / 'nonexistent_dir'}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
