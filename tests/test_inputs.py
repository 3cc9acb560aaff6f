"""Data tests (no Ray): every input kind becomes shards with stable ids, and bad inputs fail clearly.
Listing folders (Ray tasks) is tested in test_input_kinds.py."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagezoo import good_images, tar_shard

from capray import inputs
from capray.config import ConfigError, load_config
from capray.inputs import InputError, Shard
from capray.reader import read_shard
from capray.shards import done_ids
from capray.writer import ShardWriter


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [f"work_dir={tmp_path / 'work'}", *extra])


def _parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _read_all(shard: Shard, cfg, rows: int = 4) -> pa.Table:
    return pa.concat_tables(list(read_shard(shard, cfg, rows)))


def test_manifest_passes_every_other_column_through_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.csv").write_text("image,id,licence\na.jpg,1,cc-by\n/abs/b.jpg,2,\n")
    cfg = _cfg(tmp_path)
    plan = inputs.plan(cfg, str(tmp_path / "m" / "list.csv"), str(tmp_path / "work" / "inputs"))
    assert plan.kind == "manifest" and [s.kind for s in plan.shards] == ["csv"]
    table = _read_all(plan.shards[0], cfg)
    assert table["image"].to_pylist() == [str(tmp_path / "m" / "a.jpg"), "/abs/b.jpg"]
    # Text columns stay text (an id is not silently turned into a number, an empty licence into NaN).
    assert table["id"].to_pylist() == ["1", "2"] and table["licence"].to_pylist() == ["cc-by", ""]


def test_parquet_manifests_are_sharded_by_whole_row_groups_and_ids_are_stable(tmp_path: Path) -> None:
    table = pa.table({"image": [f"s3://b/{i}.jpg" for i in range(12)], "url": [f"http://x/{i}" for i in range(12)]})
    _parquet(tmp_path / "dir" / "part-0.parquet", table, row_group_size=4)  # 3 row groups
    _parquet(tmp_path / "dir" / "part-1.parquet", table.slice(0, 5))
    (tmp_path / "dir" / "_SUCCESS.parquet").write_bytes(b"")  # hidden by its leading underscore
    cfg = _cfg(tmp_path, "inputs.shard_rows=8")
    plan = inputs.plan(cfg, str(tmp_path / "dir"), "unused")
    assert [(s.row_groups, s.rows) for s in plan.shards] == [((0, 1), 8), ((2,), 4), ((0,), 5)] and plan.rows == 17
    assert [s.id for s in inputs.plan(cfg, str(tmp_path / "dir"), "unused").shards] == [s.id for s in plan.shards]
    assert len({s.id for s in plan.shards}) == 3
    assert _read_all(plan.shards[1], cfg)["image"].to_pylist() == [f"s3://b/{i}.jpg" for i in range(8, 12)]
    globbed = inputs.plan(cfg, str(tmp_path / "dir" / "part-1.*"), "unused")
    assert [s.uri for s in globbed.shards] == [str(tmp_path / "dir" / "part-1.parquet")]


def test_a_manifest_without_image_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "only_caption.csv").write_text("file,caption\na.jpg,a dog\n")
    cfg = _cfg(tmp_path)
    with pytest.raises(InputError, match=r"only_caption\.csv: no 'image' column \(found: file, caption\)"):
        inputs.plan(cfg, str(tmp_path / "only_caption.csv"), "unused")
    # A manifest of images to caption needs no caption column.
    (tmp_path / "images_only.csv").write_text("image\na.jpg\n")
    assert inputs.plan(cfg, str(tmp_path / "images_only.csv"), "unused").shards


def test_a_file_of_no_input_kind_and_manifests_without_rows_are_named(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (tmp_path / "list.tsv").write_text("image\ta.jpg\n")
    with pytest.raises(InputError, match=r"list\.tsv is a file of no input kind: give a folder or prefix of images"):
        inputs.plan(cfg, str(tmp_path / "list.tsv"), "unused")
    (tmp_path / "one.jpg").write_bytes(good_images()["scene.jpg"])
    with pytest.raises(InputError, match=r"one\.jpg is one image file: give the folder it is in"):
        inputs.plan(cfg, str(tmp_path / "one.jpg"), "unused")
    # A manifest with a header and no row is refused as a folder without images is, not run as
    # a job with nothing to do; in a folder of manifests, only when every one is empty.
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.csv").write_text("image,id\n")
    with pytest.raises(InputError, match=r"a\.csv has no rows: no images to process"):
        inputs.plan(cfg, str(tmp_path / "m" / "a.csv"), "unused")
    _parquet(tmp_path / "m" / "sub" / "b.parquet", pa.table({"image": pa.array([], pa.string())}))
    with pytest.raises(InputError, match=r"no images under .*m: its 2 \.csv/\.parquet files have no rows"):
        inputs.plan(cfg, str(tmp_path / "m"), "unused")
    (tmp_path / "m" / "c.csv").write_text("image\nx.jpg\n")
    assert inputs.plan(cfg, str(tmp_path / "m"), "unused").shards


def test_a_csv_that_is_not_utf8_is_named_by_the_plan_or_the_reader(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (tmp_path / "latin.csv").write_bytes(b"image,id\nimg/caf\xe9.jpg,1\n")
    with pytest.raises(InputError, match=r"latin\.csv: not a readable CSV file \(.*invalid UTF8"):
        inputs.plan(cfg, str(tmp_path / "latin.csv"), "unused")
    # Past the block the plan reads (64 KiB), in a file too small to be split: the reader names it.
    rows = "".join(f"img/{i:05d}.jpg,{i}\n" for i in range(5000)).encode()
    (tmp_path / "late.csv").write_bytes(b"image,id\n" + rows + b"img/caf\xe9.jpg,x\n")
    shard = inputs.plan(cfg, str(tmp_path / "late.csv"), "unused").shards[0]
    with pytest.raises(InputError, match=r"late\.csv: not a readable CSV file \(.*invalid UTF8"):
        _read_all(shard, cfg)


def test_quoted_values_over_several_lines_are_read_past_any_block(tmp_path: Path) -> None:
    """pyarrow reads a CSV in blocks cut at newlines: a caption over two lines that crossed the
    plan's 64 KiB block, or the split's 4 MiB one, failed the whole file."""
    rows = [(f"img/{i:06d}.jpg", f"a caption of image {i},\non two lines") for i in range(80_000)]
    text = "image,caption\n" + "".join(f'{image},"{caption}"\n' for image, caption in rows)
    (tmp_path / "lines.csv").write_text(text)
    assert len(text) > 4 << 20
    cfg = _cfg(tmp_path, "inputs.shard_rows=100000")  # under the size at which a CSV is split
    table = _read_all(inputs.plan(cfg, str(tmp_path / "lines.csv"), "unused").shards[0], cfg, rows=100_000)
    assert table["caption"].to_pylist() == [c for _, c in rows]
    # The same file split into Parquet parts, as a Ray task does for a large CSV.
    cfg = _cfg(tmp_path, "inputs.shard_rows=25000")
    parts = inputs.split_csv(str(tmp_path / "lines.csv"), str(tmp_path / "parts"), cfg)
    assert [n for _, n in parts] == [25_000, 25_000, 25_000, 5_000]
    captions = [c for part, _ in parts for c in pq.read_table(part)["caption"].to_pylist()]
    assert captions == [c for _, c in rows]


def test_a_column_named_twice_is_named(tmp_path: Path) -> None:
    (tmp_path / "twice.csv").write_text("image,id,image\na.jpg,1,b.jpg\n")
    with pytest.raises(InputError, match=r"twice\.csv: column\(s\) 'image' appear more than once"):
        inputs.plan(_cfg(tmp_path), str(tmp_path / "twice.csv"), "unused")


def test_a_blank_image_field_is_an_error_row_not_the_working_directory(tmp_path: Path) -> None:
    from capray.images import error_class
    from capray.worker import load_image

    (tmp_path / "list.csv").write_text("image,id\na.jpg,1\n,2\n  ,3\n")
    cfg = _cfg(tmp_path)
    table = _read_all(inputs.plan(cfg, str(tmp_path / "list.csv"), "unused").shards[0], cfg)
    assert table["image"].to_pylist() == [str(tmp_path / "a.jpg"), "", ""]
    for uri in table["_uri"].to_pylist()[1:]:
        pixels, error = load_image(uri, cfg.storage, cfg.data.max_pixels)[:2]
        assert pixels is None and error == "empty image path/URI" and error_class(error) == "empty"


def test_a_manifest_row_of_another_scheme_is_an_error_row_naming_it(tmp_path: Path) -> None:
    from capray.images import error_class
    from capray.worker import load_image

    (tmp_path / "list.csv").write_text("image\nhttps://example.com/a.jpg\nfile:///data/b.jpg\nc.jpg\n")
    cfg = _cfg(tmp_path)
    table = _read_all(inputs.plan(cfg, str(tmp_path / "list.csv"), "unused").shards[0], cfg)
    # The URIs as given, not joined to the manifest's folder as relative paths.
    assert table["image"].to_pylist() == ["https://example.com/a.jpg", "file:///data/b.jpg", str(tmp_path / "c.jpg")]
    errors = [load_image(uri, cfg.storage, cfg.data.max_pixels)[1] for uri in table["_uri"].to_pylist()]
    assert errors[0].startswith("cannot read file: https://example.com/a.jpg: not a local path") and "web" in errors[0]
    assert "give the local path without file://" in errors[1] and "not found" in errors[2]
    assert [error_class(e) for e in errors] == ["storage", "storage", "not_found"]


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    jpgs = list(good_images().values())[:3]
    path = _parquet(
        tmp_path / "laion" / "00000.parquet",
        pa.table({"key": ["k0", "k1", "k2"], "jpg": jpgs, "url": ["u0", "u1", "u2"]}),
    )
    cfg = _cfg(tmp_path)
    plan = inputs.plan(cfg, str(tmp_path / "laion"), "unused")
    assert plan.kind == "parquet_bytes" and plan.rows == 3
    table = _read_all(plan.shards[0], cfg)
    assert table["image"].to_pylist() == ["k0", "k1", "k2"] and table["_data"].to_pylist() == jpgs
    assert table["url"].to_pylist() == ["u0", "u1", "u2"]
    # Without a key column the row is named by its file and position.
    _parquet(tmp_path / "nokey" / "x.parquet", pa.table({"jpg": jpgs}))
    shard = inputs.plan(cfg, str(tmp_path / "nokey"), "unused").shards[0]
    assert _read_all(shard, cfg, rows=2)["image"].to_pylist() == ["x/0", "x/1", "x/2"]
    del path


def test_a_bytes_column_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    _parquet(tmp_path / "bad.parquet", pa.table({"key": ["a"], "jpg": ["not bytes"]}))
    with pytest.raises(
        InputError, match=r"bad\.parquet: column 'jpg' \(inputs.bytes_column\) is string, expected binary"
    ):
        inputs.plan(_cfg(tmp_path), str(tmp_path / "bad.parquet"), "unused")


def test_a_key_column_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    _parquet(tmp_path / "bad.parquet", pa.table({"key": [[1, 2]], "jpg": [b"bytes"]}))
    with pytest.raises(
        InputError, match=r"bad\.parquet: column 'key' \(inputs.key_column\) is list<element: int64>, expected text"
    ):
        inputs.plan(_cfg(tmp_path), str(tmp_path / "bad.parquet"), "unused")


@pytest.mark.parametrize(
    "column, read",
    [
        (pa.array(["a.jpg", None]).dictionary_encode(), ["a.jpg", ""]),
        (pa.array(["a.jpg", "b.jpg"], pa.large_string()), ["a.jpg", "b.jpg"]),
        (pa.array([7, 8]), ["7", "8"]),
        (pa.array([b"a.jpg", b"\xff"]), "binary"),
        (pa.array([["a.jpg"], ["b.jpg"]]), "list<element: string>"),
    ],
    ids=["dictionary", "large_string", "int", "binary", "list"],
)
def test_an_image_column_is_read_as_text_or_its_type_is_named(tmp_path: Path, column: pa.Array, read) -> None:
    uri = _parquet(tmp_path / "m.parquet", pa.table({"image": column}))
    cfg = _cfg(tmp_path)
    if isinstance(read, str):  # was an Arrow cast error in a worker, without the file's name
        with pytest.raises(InputError, match=rf"m\.parquet: column 'image' is {re.escape(read)}, expected text"):
            inputs.plan(cfg, uri, "unused")
        return
    table = _read_all(inputs.plan(cfg, uri, "unused").shards[0], cfg)
    assert [os.path.basename(name) for name in table["image"].to_pylist()] == read


def test_webdataset_members_become_rows_and_a_truncated_tar_ends_in_an_error_row(tmp_path: Path) -> None:
    images = list(good_images().values())
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(tar_shard({"a": images[0], "b": images[1]}))
    whole = tar_shard({"c": images[0], "d": images[1], "e": images[2]})
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut_at = tar.getmember("e.jpg").offset_data + 100  # inside e's image
    (tmp_path / "wds" / "00001.tar").write_bytes(whole[:cut_at])
    cfg = _cfg(tmp_path)
    plan = inputs.plan(cfg, str(tmp_path / "wds"), "unused")
    assert plan.kind == "webdataset" and plan.rows is None and len(plan.shards) == 2
    good = _read_all(plan.shards[0], cfg)
    assert good["image"].to_pylist() == ["00000/a", "00000/b"] and good["caption"].to_pylist() == [
        "caption of a",
        "caption of b",
    ]
    assert good["_error"].null_count == 2 and good["json"].to_pylist()[0] == '{"key": "a"}'
    cut = _read_all(plan.shards[1], cfg)
    errors = dict(zip(cut["image"].to_pylist(), cut["_error"].to_pylist()))
    assert errors["00001/c"] is None and errors["00001/d"] is None
    assert "truncated or corrupt tar" in errors["00001/e"] and cut["_data"].to_pylist()[-1] is None


def test_shard_files_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    table = pa.table({"image": ["a"], "error": pa.array([None], pa.string())})
    out = tmp_path / "out"
    writer = ShardWriter(str(out / "s1.parquet"), None)
    writer.write(table)
    writer.discard()  # the worker failed mid-shard
    assert os.listdir(out) == [] and done_ids(str(out)) == set()
    writer = ShardWriter(str(out / "s1.parquet"), None)
    writer.write(table)
    writer.write(table)
    assert done_ids(str(out)) == set()  # still writing: no file under the final name
    writer.publish(table.schema)
    ShardWriter(str(out / "empty.parquet"), None).publish(table.schema)  # a shard with no rows is done too
    assert done_ids(str(out)) == {"s1", "empty"} and pq.read_table(out / "s1.parquet").num_rows == 2
    assert pq.ParquetFile(out / "s1.parquet").num_row_groups == 1  # batches are gathered into row groups
    assert pq.read_table(io.BytesIO((out / "empty.parquet").read_bytes())).num_rows == 0


@pytest.mark.parametrize(
    "old, new",
    [
        ("infer.glob='*.jpg'", "inputs.glob"),
        ("infer.rows_per_file=5", "inputs.shard_rows"),
        ("infer.limit=3", "inputs.limit_shards"),
    ],
)
def test_moved_keys_name_their_new_place(old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=f"was replaced by {new}"):
        load_config(None, [old])
