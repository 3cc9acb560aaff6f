"""System tests: the bulk caption job against a real S3-protocol server, on local Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images
from PIL import Image

import capray
from capray import overview, pipeline, progress, storage
from capray.captioning import InputError, caption
from capray.checkpoint import CheckpointError
from capray.config import load_config
from capray.images import ImageDecodeError, error_class
from capray.status import read_status

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: str, ray_local) -> str:
    """An untrained checkpoint: rows, resume, errors and agreement with the single-image function
    do not depend on what the model learned (test_jobs.py, test_precision.py and
    tests/system/test_train_on_s3.py caption with trained ones)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def zoo(s3) -> str:
    """A bucket with the image zoo under photos/ (good, awkward and broken files)."""
    bucket = s3.bucket("zoo")
    cfg = s3.config()
    for name, data in good_images().items():
        storage.write_bytes(f"{bucket}/photos/{name}", data, cfg.storage)
    for name, (data, _) in bad_images().items():
        storage.write_bytes(f"{bucket}/photos/{name}", data, cfg.storage)
    storage.write_bytes(f"{bucket}/photos/readme.txt", b"not listed: wrong extension", cfg.storage)
    return f"{bucket}/photos"


def _rows(cfg, out: str) -> pd.DataFrame:
    fs, path = storage.filesystem(out, cfg.storage)
    return pq.ParquetDataset(path, filesystem=fs).read().to_pandas()


def test_every_image_gets_exactly_one_row_and_reruns_resume(s3, zoo: str, checkpoint: str) -> None:
    cfg = s3.config(
        f"data.max_pixels={TEST_MAX_PIXELS}",
        "caption.batch_size=4",
        "inputs.shard_rows=3",
        f"work_dir={s3.bucket('out')}/work",
    )
    out = f"{s3.bucket('out')}/captions"
    n = len(good_images()) + len(bad_images())

    # A trial run of one shard stands in for a run interrupted after its first file.
    cfg.inputs.limit_shards = 1
    first = caption(cfg, checkpoint, zoo, out)
    shards = first["shards"]
    assert (
        shards > 1
        and first["shards_written"] == 1
        and first["remaining_shards"] == shards - 1
        and 0 < first["written"] < n
    )
    # The status of a stopped job: one shard of all, its rows and errors, no ETA (not running).
    partial = read_status(out, cfg.storage)
    assert (partial["shards"]["done"], partial["shards"]["total"]) == (1, shards)
    assert partial["rows"]["done"] == first["written"] and partial["rows"]["total"] == n
    assert partial["job"]["state"] == "finished" and not partial["job"]["alive"] and partial["eta_s"] is None
    cfg.inputs.limit_shards = 0
    # A dry run: the plan, what is done, an estimate from the first shard's stats; nothing written.
    before = {f: storage.read_bytes(f, cfg.storage) for f in storage.list_files(out, cfg.storage)}
    cfg.inputs.dry_run = True
    dry = caption(cfg, checkpoint, zoo, out)["plan"]
    cfg.inputs.dry_run = False
    assert (dry["shards"], dry["rows"], dry["done_shards"], dry["done_rows"]) == (shards, n, 1, first["written"])
    assert dry["todo_shards"] == shards - 1 and dry["todo_rows"] == n - first["written"] and dry["estimate_s"] > 0
    assert "estimate" in pipeline.plan_lines("caption", dry)[1]
    assert {f: storage.read_bytes(f, cfg.storage) for f in storage.list_files(out, cfg.storage)} == before
    second = caption(cfg, checkpoint, zoo, out)
    assert (second["already_done"], second["written"], second["remaining_shards"]) == (
        first["written"],
        n - first["written"],
        0,
    )
    assert first["failed"] + second["failed"] == len(bad_images()) and second["images"] == n

    rows = _rows(cfg, out)
    _stats_match_rows(cfg, out, rows, partial)
    assert len(rows) == n and rows["image"].is_unique
    assert list(rows.columns) == [
        "image",
        "caption",
        "log_prob",
        "num_tokens",
        "strategy",
        "model",
        "error",
        "image_version",
    ]
    by_image = rows.set_index("image")
    for name in good_images():
        row = by_image.loc[f"{zoo}/{name}"]
        assert pd.isna(row["error"]) and row["caption"] and row["num_tokens"] >= 1 and row["model"] == checkpoint
    for name, (_, reason) in bad_images().items():
        row = by_image.loc[f"{zoo}/{name}"]
        assert reason in row["error"] and pd.isna(row["caption"])

    third = caption(cfg, checkpoint, zoo, out)
    assert (third["written"], third["already_done"], third["shards_done_before"]) == (0, n, shards)
    assert len(_rows(cfg, out)) == n

    # The overview page of this output on the S3 server, its thumbnails read back from the bucket
    # (capray/overview.py; the page in a browser: tests/test_overview.py).
    cfg.overview.gallery = 3
    made = overview.build(out, cfg)
    page = storage.read_bytes(made["html"], cfg.storage).decode()
    assert made["html"] == f"{out}/_status/overview.html" and (made["rows"], made["failed"]) == (n, len(bad_images()))
    assert made["errors"] == {c: 1 for c in ("empty", "not_an_image", "too_large", "truncated")}
    assert page.count('<img src="data:image/jpeg;base64,') == 6 and "notes.jpg" in page


def _stats_match_rows(cfg, out: str, rows: pd.DataFrame, partial: dict) -> None:
    """Every file's footer stats count its rows by error class; `capray status` sums them."""
    classes = {"truncated.jpg": "truncated", "empty.jpg": "empty", "notes.jpg": "not_an_image", "huge.png": "too_large"}
    by_image = rows.set_index("image")
    for name, cls in classes.items():
        err = by_image.loc[next(i for i in by_image.index if i.endswith("/" + name)), "error"]
        assert error_class(err) == cls and " at 0x" not in err, err
    counted: dict[str, int] = {}
    files = [f for f in storage.list_files(out, cfg.storage, (".parquet",)) if "/_" not in f]
    for f in files:
        stats = progress.footer_stats(f, cfg.storage)
        fs, path = storage.filesystem(f, cfg.storage)
        with fs.open_input_file(path) as handle:
            file_rows = pq.ParquetFile(handle).metadata.num_rows
        assert stats is not None and stats["rows"] == file_rows and stats["ok"] + stats["failed"] == file_rows
        assert stats["config_digest"] and stats["checkpoint"] and stats["node"] and stats["ended"] >= stats["started"]
        for c, k in stats["errors"].items():
            counted[c] = counted.get(c, 0) + k
    expected = rows["error"].dropna().map(error_class).value_counts().to_dict()
    assert counted == expected == {c: 1 for c in classes.values()}
    done = read_status(out, cfg.storage)
    assert done["errors"] == expected and done["rows"]["failed"] == len(classes)
    assert done["shards"]["done"] == done["shards"]["total"] == len(files) and done["eta_s"] == 0.0
    assert done["shards"]["stats_rolled_up"] == len(files) and done["job"]["state"] == "finished"
    assert done["rows"]["done"] == len(rows) and done["bytes_read"] > 0 and done["seconds"]["model"] > 0


def test_job_rows_equal_the_python_api_for_every_input_type(s3, zoo: str, checkpoint: str, tmp_path: Path) -> None:
    cfg = s3.config(
        f"data.max_pixels={TEST_MAX_PIXELS}", "inputs.glob='*.jpg'", "caption.attention=true", f"work_dir={tmp_path}"
    )
    out = str(tmp_path / "captions")
    caption(cfg, checkpoint, zoo, out)
    rows = pd.read_parquet(out).set_index("image")
    assert all(i.endswith(".jpg") for i in rows.index)
    captioner = capray.Captioner.load(checkpoint, storage=cfg.storage, max_pixels=TEST_MAX_PIXELS, batch_size=2)
    names = ["scene.jpg", "cmyk.jpg", "dir with space/ünïcode café.jpg"]
    blobs = [good_images()[n] for n in names]
    by_bytes = captioner.caption(blobs, attention=True)
    by_uri = captioner.caption([f"{zoo}/{n}" for n in names])
    with Image.open(io.BytesIO(blobs[0])) as img:
        by_pil, by_array = captioner.caption(img)[0], captioner.caption(np.asarray(img.convert("RGB")))[0]
    for name, c, u in zip(names, by_bytes, by_uri):
        row = rows.loc[f"{zoo}/{name}"]
        assert (c.text, u.text) == (row["caption"], row["caption"])
        assert c.num_tokens == row["num_tokens"] and abs(c.log_prob - row["log_prob"]) < 1e-4
        assert np.allclose(np.stack(row["attention"]), c.token_attention, atol=1e-5)
        assert u.attention is None  # only on request
    # A decoded image (PIL or array) goes through the same conversion and resize as a file.
    assert by_pil.text == by_array.text == by_bytes[0].text


def test_the_python_api_refuses_unsupported_inputs_by_position(checkpoint: str, s3) -> None:
    captioner = capray.Captioner.load(checkpoint, storage=s3.config().storage)
    with pytest.raises(TypeError, match=r"image 1 \(int\): unsupported image type int"):
        captioner.caption([good_images()["scene.jpg"], 7])
    with pytest.raises(ImageDecodeError, match=r"image 0 \(bytes\): cannot decode image"):
        captioner.caption([b"not an image"])
    with pytest.raises(TypeError, match="unsupported array of dtype float32"):
        captioner.caption(np.zeros((8, 8, 3), np.float32))
    # on_error="keep": the jobs' behaviour, an error per image and the good ones captioned.
    scene = good_images()["scene.jpg"]
    kept = captioner.caption([scene, 7, b"not an image", scene, " "], on_error="keep")
    assert [c.error is None for c in kept] == [True, False, False, True, False]
    assert kept[0].text and kept[0].text == kept[3].text == captioner.caption(scene)[0].text
    assert [error_class(c.error) for c in kept[1:3]] == ["not_an_image", "not_an_image"] and kept[1].text == ""
    assert kept[4].error == "image 4 (' '): empty image path/URI"  # not a read of the working directory
    assert " at 0x" not in kept[2].error and "image 2 (bytes)" in kept[2].error


def test_missing_checkpoint_fails_before_any_work(s3, zoo: str, tmp_path: Path) -> None:
    cfg = s3.config(f"work_dir={tmp_path}")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        caption(cfg, str(tmp_path / "no-such-checkpoint"), zoo, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_fails_with_a_clear_message(checkpoint: str, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "storage.endpoint_url=http://127.0.0.1:9",
            "storage.region=us-east-1",
            "storage.access_key_id=x",
            "storage.secret_access_key=y",
        ],
    )
    with pytest.raises(InputError, match="cannot list s3://nowhere/photos"):
        caption(cfg, checkpoint, "s3://nowhere/photos", str(tmp_path / "out"))


def test_beam_search_rows_record_the_strategy_and_match_the_library(
    s3, zoo: str, checkpoint: str, tmp_path: Path
) -> None:
    cfg = s3.config(
        f"data.max_pixels={TEST_MAX_PIXELS}", "caption.strategy=beam", "caption.beam_size=3", f"work_dir={tmp_path}"
    )
    out = str(tmp_path / "beam")
    caption(cfg, checkpoint, zoo, out)
    rows = pd.read_parquet(out).set_index("image")
    good = rows[rows["error"].isna()]
    assert len(good) == len(good_images()) and (good["strategy"] == "beam3").all()
    captioner = capray.Captioner.load(checkpoint, "beam", beam_size=3, storage=cfg.storage, max_pixels=TEST_MAX_PIXELS)
    assert captioner.strategy == "beam3"
    for name, c in zip(sorted(good_images()), captioner.caption([good_images()[n] for n in sorted(good_images())])):
        assert rows.loc[f"{zoo}/{name}", "caption"] == c.text, name


def test_the_caption_job_sees_the_features_the_extract_job_stored(checkpoint: str, tmp_path: Path) -> None:
    # Both jobs decode with one function (JPEG draft mode included: the first photo is 2000x1500)
    # and run the same encoder: greedy decoding of the extract job's stored float32 features
    # gives the caption job's rows for the same files.
    import io

    import numpy as np
    from PIL import Image

    from capray import checkpoint as ckpt
    from capray import extraction

    folder = tmp_path / "photos"
    folder.mkdir()
    scene = Image.open(io.BytesIO(good_images()["scene.jpg"])).convert("RGB")
    scene.resize((2000, 1500), Image.BICUBIC).save(folder / "large.jpg", quality=90)
    (folder / "small.jpg").write_bytes(good_images()["scene.jpg"])
    (folder / "rotated.jpg").write_bytes(good_images()["rotated.jpg"])
    cfg = load_config(
        None,
        [
            f"work_dir={tmp_path / 'work'}",
            "backbone.weights=random",
            "extract.dtype=float32",
            f"extract.input={folder}",
            f"data.max_pixels={TEST_MAX_PIXELS * 4}",
        ],
    )
    assert extraction.run(cfg)["extracted"] == 3
    stored = pd.read_parquet(tmp_path / "work" / "features").set_index("image")
    out = tmp_path / "captions"
    assert caption(cfg, checkpoint, str(folder), str(out))["captioned"] == 3
    rows = pd.read_parquet(out).set_index("image")
    model, tokenizer, _, _ = ckpt.load(checkpoint)
    for image, row in rows.iterrows():
        feats = np.frombuffer(stored.loc[image, "features"], np.float32).reshape(1, 64, 2048)
        tokens, _, log_prob, _ = model.greedy(
            feats, tokenizer.max_length - 1, start_id=tokenizer.start_id, end_id=tokenizer.end_id
        )
        assert tokenizer.decode(tokens.numpy()[0]) == row["caption"], image
        assert abs(float(log_prob[0]) - row["log_prob"]) < 1e-4 * max(1.0, abs(row["log_prob"])), image
