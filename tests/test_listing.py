"""Unit tests of listings (capray/listing.py): key order, content-defined chunks that stay put
when keys come and go, and the range overlaps that tell which old files a new shard replaces."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq

from capray import listing
from capray.config import load_config


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"work_dir={tmp_path}/work", *overrides])


def test_a_local_walk_is_in_the_byte_order_of_s3_keys(tmp_path: Path) -> None:
    # "a.b/x" < "a/x" < "a0" in byte order ('.' < '/' < '0'): a folder sorts as its name + "/".
    for name in ("a0.jpg", "a/x.jpg", "a.b/x.jpg", "a/b/y.jpg", "ab.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"12345")
    keys = [e.uri for e in listing.walk(str(tmp_path), recursive=True)]
    assert keys == sorted(keys) and len(keys) == 5
    entry = next(e for e in listing.walk(str(tmp_path), recursive=False) if not e.is_dir)
    assert entry.size == 5 and entry.version  # size and mtime come with the listing
    top = [(Path(e.uri).name, e.is_dir) for e in listing.walk(str(tmp_path), recursive=False)]
    assert top == [("a.b", True), ("a", True), ("a0.jpg", False), ("ab.jpg", False)]


def _chunks(keys: list[str], tmp_path: Path, n: int) -> list[dict]:
    writer = listing.ChunkWriter(str(tmp_path / "chunks"), "t", n)
    for k in keys:
        writer.add(k, "v")
    writer.cut()
    return writer.chunks


def test_chunk_boundaries_depend_on_the_keys_so_an_insertion_changes_one_chunk(tmp_path: Path) -> None:
    keys = [f"s3://b/img/{i:06d}.jpg" for i in range(0, 20_000, 2)]
    before = _chunks(keys, tmp_path / "before", 100)
    assert all(c["rows"] <= 200 for c in before) and 50 <= len(before) <= 200  # about shard_rows each
    inserted = "s3://b/img/010001.jpg"
    after = _chunks(sorted(keys + [inserted]), tmp_path / "after", 100)
    changed = [c for c in after if (c["first"], c["digest"]) not in {(b["first"], b["digest"]) for b in before}]
    assert len(changed) <= 2 and any(c["first"] <= inserted <= c["last"] for c in changed)
    # A chunk file holds its keys and their versions, in order.
    t = pq.read_table(after[0]["file"])
    assert t.column_names == ["image", "image_version"] and t["image"].to_pylist() == sorted(t["image"].to_pylist())


def test_listing_a_folder_with_files_around_sub_folders_writes_every_chunk_once(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    names = ["a.jpg", "b/1.jpg", "b/2.jpg", "c.jpg", "d.jpg", "e/3.jpg", "f.jpg"]
    others = ["a.txt", "b/1.json", "b/2.json", "e/README", "e/.DS_Store", "f.avif"]  # the last two: at the top
    for name in names + others:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    cfg = _cfg(tmp_path, "inputs.shard_rows=1")
    segments = listing.list_top(str(root), str(tmp_path / "out"), cfg)
    assert [kind for kind, _ in segments] == ["chunks", "folders", "chunks", "folders", "chunks", "passed"]
    assert segments[-1][1] == {".txt": 1, ".avif": 1}  # the top level's files that are not images
    chunks = [c for kind, items in segments if kind == "chunks" for c in items]
    files = [c["file"] for c in chunks]
    assert len(set(files)) == len(files)  # a chunk after a sub-folder never overwrites an earlier one
    folders = [f for kind, items in segments if kind == "folders" for f in items]
    listed_folders = [listing.list_folders([f], str(tmp_path / "out"), i + 1, cfg) for i, f in enumerate(folders)]
    chunks += [c for got, _ in listed_folders for c in got]
    listed = sorted(k for c in chunks for k in pq.read_table(c["file"])["image"].to_pylist())
    assert listed == sorted(str(root / n) for n in names)
    # Hidden files are not counted: .DS_Store is nobody's image.
    assert [passed for _, passed in listed_folders] == [{".json": 2}, {"(no extension)": 1}]


def test_files_passed_over_are_counted_by_extension_up_to_a_bound() -> None:
    passed: dict[str, int] = {}
    for i in range(listing.PASSED_KINDS + 5):
        listing.pass_over(passed, f"s3://b/file.k{i:02d}")
    listing.count_passed(passed, ".k00", 3)  # a kind already counted keeps its own count
    assert len(passed) == listing.PASSED_KINDS + 1 and passed["(other)"] == 5 and passed[".k00"] == 4
    assert listing.passed_summary({".txt": 2, ".avif": 7, ".json": 2}) == "7 .avif, 2 .json, 2 .txt"


def test_overlaps_find_every_old_range_a_new_one_covers() -> None:
    rng = random.Random(0)
    keys = sorted({f"{rng.randrange(10**6):07d}" for _ in range(400)})

    def cut(n: int) -> list[tuple[str, str]]:
        firsts = sorted(rng.sample(keys, n))
        return listing.ranges([{"first": f} for f in firsts])

    new = cut(20)
    old = cut(15) + cut(9)  # two earlier listings: old ranges overlap each other too
    found = listing.overlaps(new, old)

    def meet(a: tuple[str, str], b: tuple[str, str]) -> bool:
        return (not b[1] or a[0] < b[1]) and (not a[1] or b[0] < a[1])

    assert found == [sorted(j for j, o in enumerate(old) if meet(n, o)) for n in new]


def test_the_jobs_own_folders_inside_an_input_are_named_once(tmp_path: Path) -> None:
    # The work_dir and an output inside it: the work_dir alone; the input itself and folders
    # outside it, or beside it under a longer name, are not inside it.
    own = ["s3://b/in/w/", "s3://b/in/w/features", "s3://b/in", "s3://b/input/x", "gs://b/in/y"]
    assert listing.inside("s3://b/in/", own) == ["s3://b/in/w"]
    assert listing.inside(str(tmp_path), [str(tmp_path / "w"), "w"]) == [str(tmp_path / "w")]


def test_local_links_are_followed_except_loops_and_what_is_no_regular_file(tmp_path: Path) -> None:
    import os

    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    (elsewhere / "deep").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "real" / "r.jpg").write_bytes(b"rr")
    (elsewhere / "deep" / "e.jpg").write_bytes(b"eee")
    (elsewhere / "deep" / "up").symlink_to(elsewhere)  # a loop below a linked folder
    (root / "linked").symlink_to(elsewhere)  # a folder of photos linked into the input
    (root / "b.jpg").symlink_to(elsewhere / "deep" / "e.jpg")  # a linked file: the file's size
    (root / "real" / "back").symlink_to(root)  # a loop to the input itself
    (root / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")  # broken: read (and failed) as a missing image
    os.mkfifo(root / "pipe.jpg")  # reading it would block the reader for ever
    cfg = _cfg(tmp_path, "inputs.shard_rows=1")

    walked = {Path(e.uri).relative_to(root).as_posix(): e for e in listing.walk(str(root), recursive=True)}
    assert sorted(walked) == [
        "a.jpg", "b.jpg", "gone.jpg", "linked/deep/e.jpg", "linked/deep/up", "pipe.jpg", "real/back", "real/r.jpg"
    ]  # fmt: skip
    assert [e.size for e in (walked["b.jpg"], walked["linked/deep/e.jpg"])] == [3, 3]
    assert walked["gone.jpg"].version.startswith("link:") and not walked["gone.jpg"].note
    notes = {k: e.note for k, e in walked.items() if e.note}
    assert notes == {
        "linked/deep/up": "(link to a folder above it)",
        "pipe.jpg": "(not a regular file)",
        "real/back": "(link to a folder above it)",
    }

    # The listing's Ray tasks: the top level, then each sub-folder from its own path.
    segments = listing.list_top(str(root), str(tmp_path / "out"), cfg)
    top = sorted(
        k
        for kind, items in segments
        if kind == "chunks"
        for c in items
        for k in pq.read_table(c["file"])["image"].to_pylist()
    )
    assert top == sorted(str(root / n) for n in ("a.jpg", "b.jpg", "gone.jpg"))
    assert segments[-1] == ["passed", {"(not a regular file)": 1}]
    folders = [f for kind, items in segments if kind == "folders" for f in items]
    assert folders == [str(root / "linked"), str(root / "real")]
    below = [listing.list_folders([f], str(tmp_path / "out"), i + 1, cfg) for i, f in enumerate(folders)]
    keys = [sorted(k for c in chunks for k in pq.read_table(c["file"])["image"].to_pylist()) for chunks, _ in below]
    assert keys == [[str(root / "linked/deep/e.jpg")], [str(root / "real/r.jpg")]]
    assert [passed for _, passed in below] == [{"(link to a folder above it)": 1}] * 2
