"""`capray overview` (capray/overview.py): the merge of per-part summaries (top-k, histograms, the
hash sample) without Ray; thumbnails read back from each input kind; and the page of a caption
output with bad images, built by Ray tasks and opened in headless chromium (Debian's `chromium`
and `chromium-driver`, which .ci/run installs)."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import caption_output
from imagezoo import bad_images, tar_shard
from PIL import Image

from capray import cli, overview, synthetic
from capray.config import load_config
from capray.overview import CONFIDENCE_BINS, LENGTH_BINS, Summary, summarize

CHROMEDRIVER = "/usr/bin/chromedriver"


def rows(n: int, seed: int = 0, failed_every: int = 0) -> pa.Table:
    """`n` caption rows with random lengths and log-probs; every `failed_every`-th one failed."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 60, n)
    log_prob = -rng.random(n) * tokens * 3
    error = [f"cannot decode image: bad {i}" if failed_every and i % failed_every == 0 else None for i in range(n)]
    ok = [e is None for e in error]
    return pa.table(
        {
            "image": [f"s3://b/img/{seed}-{i:05d}.jpg" for i in range(n)],
            "caption": [f"caption {i}" if o else None for i, o in enumerate(ok)],
            "log_prob": pa.array([float(v) if o else None for v, o in zip(log_prob, ok)], pa.float32()),
            "num_tokens": pa.array([int(t) if o else None for t, o in zip(tokens, ok)], pa.int32()),
            "error": error,
        }
    )


def merged(parts: list[pa.Table], k: int) -> Summary:
    total = Summary(k)
    for i, part in enumerate(parts):
        total = total.merge(summarize(part, f"shard{i}", k))
    return total


def test_parts_merge_to_the_summary_of_the_whole() -> None:
    whole = rows(3000, failed_every=7)
    one = summarize(whole, "shard0", 10)
    # The same rows cut in uneven parts, merged in another order.
    cuts = [0, 5, 700, 701, 2000, 3000]
    parts = [whole.slice(a, b - a) for a, b in itertools.pairwise(cuts)]
    many = merged(parts[::-1], 10)
    assert (one.rows, one.ok, one.failed) == (many.rows, many.ok, many.failed) == (3000, 3000 - 429, 429)
    assert one.errors == many.errors == {"decode": 429} and len(many.examples["decode"]) == 3
    np.testing.assert_array_equal(one.length, many.length)
    np.testing.assert_array_equal(one.confidence, many.confidence)
    assert one.length.sum() == one.confidence.sum() == one.ok
    assert [r["key"] for r in one.least] == [r["key"] for r in many.least]
    assert [r["key"] for r in one.sample] == [r["key"] for r in many.sample]
    # The least confident are the true 10 lowest log-prob per token of the captioned rows.
    ok = whole.filter(whole["error"].is_null())
    conf = ok["log_prob"].to_numpy().astype(np.float64) / ok["num_tokens"].to_numpy()
    assert [r["confidence"] for r in many.least] == pytest.approx(sorted(conf)[:10])
    assert all(r["caption"].startswith("caption ") for r in many.least)


def test_the_random_sample_is_deterministic_and_depends_on_the_keys() -> None:
    a = merged([rows(500, seed=1), rows(500, seed=2)], 8)
    b = merged([rows(1000, seed=1).slice(0, 500), rows(500, seed=2)], 8)
    assert [r["key"] for r in a.sample] == [r["key"] for r in b.sample]
    assert [r["hash"] for r in a.sample] == sorted(r["hash"] for r in a.sample)
    # Spread over both parts (a hash, not the first rows), and other keys give other rows.
    assert {r["shard"] for r in a.sample} == {"shard0", "shard1"}
    other = merged([rows(500, seed=3), rows(500, seed=4)], 8)
    assert not {r["key"] for r in other.sample} & {r["key"] for r in a.sample}
    least = {r["key"] for r in a.least}
    assert least != {r["key"] for r in a.sample}


def test_fixed_bins_clip_at_both_ends() -> None:
    np.testing.assert_array_equal(
        overview.length_bins(np.array([0, 3, 3, 500])), _one_hot(LENGTH_BINS, {0: 1, 3: 2, -1: 1})
    )
    np.testing.assert_array_equal(
        overview.confidence_bins(np.array([-100.0, -0.001, 0.0])), _one_hot(CONFIDENCE_BINS, {0: 1, -1: 2})
    )
    rates, t0, t1 = overview.throughput_bins([("a", 0.0, 10.0, 100), ("b", 5.0, 20.0, 300)], bins=4)
    assert (t0, t1) == (0.0, 20.0) and rates == [0.0, 0.0, 20.0, 60.0]  # rows / 5 s in the bin each ended in


def _one_hot(n: int, counts: dict[int, int]) -> np.ndarray:
    out = np.zeros(n, np.int64)
    for i, c in counts.items():
        out[i] += c
    return out


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def _size(data_uri: str) -> tuple[int, int]:
    import base64

    assert data_uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).size


def test_thumbnails_are_read_back_from_tars_parquet_bytes_and_manifests(tmp_path: Path) -> None:
    """Every input kind maps an output key back to its image's bytes (keys made by capray.reader)."""
    from capray.inputs import KEY, plan
    from capray.reader import read_shard

    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}"])
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "00000.tar").write_bytes(
        tar_shard({"a": _jpeg((255, 0, 0)), "b": _jpeg((0, 0, 255)), "c": b"not an image"})
    )
    blobs = pa.table({"jpg": [_jpeg((0, 255, 0)), _jpeg((9, 9, 9))]})
    (tmp_path / "bytes").mkdir()
    pq.write_table(blobs, tmp_path / "bytes" / "nokey.parquet", row_group_size=1)
    pq.write_table(
        blobs.append_column("key", pa.array(["x", "y"])), tmp_path / "bytes" / "keyed.parquet", row_group_size=1
    )
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(_jpeg((1, 2, 3), (90, 600)))
    (tmp_path / "m.csv").write_text("image\nphotos/p.jpg\nphotos/gone.jpg\n")
    cfg.inputs.bytes_column, cfg.inputs.key_column = "jpg", "key"

    for uri, want in [
        (str(tmp_path / "tars"), {"00000/a", "00000/b", "00000/c"}),
        (str(tmp_path / "bytes" / "nokey.parquet"), {"nokey/0", "nokey/1"}),
        (str(tmp_path / "bytes" / "keyed.parquet"), {"x", "y"}),
        (str(tmp_path / "m.csv"), {str(tmp_path / "photos" / n) for n in ("p.jpg", "gone.jpg")}),
    ]:
        for shard in plan(cfg, uri, str(tmp_path / "work" / "inputs")).shards:
            keys = [k for t in read_shard(shard, cfg, 100) for k in t[KEY].to_pylist()]
            assert set(keys) == want, uri
            got = overview.read_thumbnails(shard.kind, shard.source, [*keys, "nokey/7"], cfg, 64)
            made = {k for k, (u, _) in got.items() if u}
            assert made == want - {"00000/c", str(tmp_path / "photos" / "gone.jpg")}, uri
            assert all(max(_size(got[k][0])) == 64 for k in made)
            assert got["nokey/7"][0] == "" and got["nokey/7"][1], uri  # a placeholder with a reason
    assert (
        "not found" in got[str(tmp_path / "photos" / "gone.jpg")][1]
        or "No such file" in got[str(tmp_path / "photos" / "gone.jpg")][1]
    )


@pytest.fixture(scope="module")
def page(ray_local, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The page of a caption output (a folder of 14 scenes and 4 bad images, 3 shards) with
    galleries of 4: built by the command, Ray tasks and all."""
    root = tmp_path_factory.mktemp("overview")
    photos = root / "photos"
    photos.mkdir()
    for i in range(14):
        synthetic.render(seed=3, index=i)[0].save(photos / f"scene_{i:02d}.jpg", quality=85)
    for name, (data, _) in bad_images().items():
        (photos / name).write_bytes(data)
    cfg = load_config(None, [f"work_dir={root / 'work'}", "inputs.shard_rows=7", "data.max_pixels=1000000"])
    output = str(root / "captions")
    made = caption_output(cfg, str(photos), output)
    html = root / "page.html"
    assert cli.main(["overview", output, "overview.gallery=4", "--html", str(html)]) == 0
    return html, made


def test_the_command_writes_the_page_of_the_output(page: tuple[Path, dict]) -> None:
    html, made = page
    text = html.read_text()
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert text.count('<img src="data:image/jpeg;base64,') == 8
    # The four least confident are the last four captioned (the builder's log-probs fall with k).
    least = text.split('id="least"', 1)[1].split("</section>", 1)[0]
    assert all(f"caption {k} of" in least for k in range(10, 14)) and "caption 9 of" not in least
    failed = {k: v for k, v in made.items() if not v.startswith("caption ")}
    assert len(failed) == 4 and all(Path(k).name in text for k in failed)


def test_the_page_opens_in_headless_chromium_with_no_console_error(page: tuple[Path, dict], tmp_path: Path) -> None:
    if not (shutil.which("chromium") and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no chromium or chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    html, made = page
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver given: Selenium Manager never downloads one. Chromium's own temp files (a
    # singleton socket folder it never removes) go to a folder removed afterwards; a short one:
    # the socket's path must fit in 107 bytes, which tmp_path under pytest-xdist does not.
    temp = tempfile.mkdtemp(prefix="chr", dir="/tmp")
    service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "TMPDIR": temp})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(html.as_uri())
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        for gallery in ("least", "random"):
            figures = driver.find_elements(By.CSS_SELECTOR, f"#{gallery} figure")
            assert len(figures) == 4, gallery
            for fig in figures:
                img = fig.find_element(By.TAG_NAME, "img")
                # Decoded by the browser: a real picture, not a broken-image icon.
                assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 160
                text = fig.find_element(By.CSS_SELECTOR, ".c").text
                assert text.startswith("caption ") and made[fig.find_element(By.CSS_SELECTOR, ".k").text] == text
        for plot in ("throughput", "length", "confidence"):
            bars = driver.find_elements(By.CSS_SELECTOR, f"#{plot} svg rect")
            assert bars and any(float(b.get_attribute("height") or 0) > 0 for b in bars), plot
        errors = driver.find_element(By.ID, "errors").text
        assert "empty" in errors and "empty.jpg" in errors and "too_large" in errors
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        driver.save_screenshot(str(tmp_path / "overview.png"))
        assert (tmp_path / "overview.png").stat().st_size > 10_000
    finally:
        driver.quit()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_folder_that_is_no_caption_output_is_one_line_with_exit_code_3(
    page: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "x").mkdir()
    assert cli.main(["overview", str(tmp_path / "x")]) == 3
    assert "no _shards.parquet" in capsys.readouterr().err
    assert cli.main(["overview", str(tmp_path / "nothing")]) == 3
    assert "output folder not found" in capsys.readouterr().err
    # A features folder (here: a caption file without its caption columns) is refused by name.
    features = tmp_path / "features"
    shutil.copytree(page[0].parent / "captions", features)
    first = sorted(features.glob("list-*.parquet"))[0]
    pq.write_table(pq.read_table(first).drop_columns(["caption", "log_prob"]), first)
    assert cli.main(["overview", str(features)]) == 3
    assert "no caption, log_prob column: not an output file of capray caption" in capsys.readouterr().err
