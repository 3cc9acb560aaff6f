"""`capray overview OUTPUT`: a caption job's output as one self-contained HTML page.

Why: after a job over 10^7-10^8 images the only way to look at its captions was to read Parquet.
The page answers at a glance how fast the job went, why images failed, how long and how confident
the captions are, and what the least confident ones look like next to their images. It opens from
a file with no server and makes no network request: plots are inline SVG drawn here (no script at
all, so nothing can log a console error), thumbnails are JPEG data URIs, every text is escaped.

How, at 10^8 rows with O(shards) + O(N) in the driver:

    Ray tasks     one per group of output files; only `image`, `caption`, `log_prob`, `num_tokens`
                  and `error` are read, in batches. Each returns a mergeable `Summary`: fixed-bin
                  histograms of caption length (tokens) and confidence (log-prob per token), the
                  k least confident rows, the k rows with the smallest hash of their key (a
                  deterministic random sample: the same rows whatever the grouping), counts and a
                  few examples per error class, and each file's footer times (capray.progress)
    the driver    merges the summaries as they finish (a bounded number of tasks in flight), so
                  it holds k + k rows, the histograms and one time pair per shard, never a row
                  per image
    thumbnails    one Ray task per input shard holding gallery images: the 2N images are read
                  back from the input the way capray.reader reads that kind (a path/URI, a tar's
                  member, a Parquet row's bytes), shrunk to `overview.thumbnail_px` JPEGs; one
                  that cannot be read is a placeholder with the reason, never a failed page

The input's settings (extensions, bytes/key columns) come from the job's saved config beside the
output (`_capray_config.yaml`), the shard kinds and input files from its index (`_shards.parquet`).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capray import progress, shards, storage
from capray.images import clean_message, error_class
from capray.inputs import InputError

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)

PAGE = "overview.html"  # under <output>/_status/ unless overview.html names another file
COLUMNS = ("image", "caption", "log_prob", "num_tokens", "error")
BATCH_ROWS = 65_536
# Fixed bins, so that histograms of any part of the output add up: caption length in tokens
# (one bin per count, the last one for LENGTH_BINS - 1 and more) and confidence, the mean
# log-probability per token, in CONFIDENCE_BINS bins over [CONFIDENCE_MIN, 0] (lower values in
# the first bin).
LENGTH_BINS = 41
CONFIDENCE_MIN = -6.0
CONFIDENCE_BINS = 48
ERROR_EXAMPLES = 3
TIME_BINS = 48
# Output files per task at most, and tasks in flight per CPU: the driver holds the results of
# the tasks in flight (2k rows each) and the merged one.
MAX_FILES_PER_TASK = 64
IN_FLIGHT_PER_CPU = 2


# --- per-part summaries and their merge (no Ray: tests/test_overview.py) ----------------------


def key_hash(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each key, the same in every process (pandas' hash has a fixed seed;
    Python's hash() is salted per process): the random sample is reproducible."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object))


@dataclass
class Summary:
    """What a part of the output contributes to the page; `merge` of two is the whole's."""

    k: int
    rows: int = 0
    ok: int = 0
    failed: int = 0
    length: np.ndarray = field(default_factory=lambda: np.zeros(LENGTH_BINS, np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(CONFIDENCE_BINS, np.int64))
    errors: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # Rows {key, caption, confidence, tokens, hash, shard}: the k least confident (confidence,
    # key) and the k of smallest hash (hash, key), each sorted.
    least: list[dict[str, Any]] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    # One (shard, started, ended, new rows) per file with stats in its footer.
    times: list[tuple[str, float, float, int]] = field(default_factory=list)
    files: int = 0

    def merge(self, other: Summary) -> Summary:
        """The summary of both parts (associative and commutative: any grouping gives the same page)."""
        errors = dict(self.errors)
        examples = {c: list(v) for c, v in self.examples.items()}
        for c, n in other.errors.items():
            errors[c] = errors.get(c, 0) + n
        for c, v in other.examples.items():
            examples[c] = sorted(set(examples.get(c, []) + v))[:ERROR_EXAMPLES]
        return Summary(
            self.k,
            self.rows + other.rows,
            self.ok + other.ok,
            self.failed + other.failed,
            self.length + other.length,
            self.confidence + other.confidence,
            dict(sorted(errors.items())),
            dict(sorted(examples.items())),
            _smallest(self.least + other.least, ("confidence", "key"), self.k),
            _smallest(self.sample + other.sample, ("hash", "key"), self.k),
            self.times + other.times,
            self.files + other.files,
        )


def _smallest(rows: list[dict[str, Any]], by: tuple[str, str], k: int) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r[by[0]], r[by[1]]))[:k]


def length_bins(num_tokens: np.ndarray) -> np.ndarray:
    return np.bincount(np.clip(num_tokens, 0, LENGTH_BINS - 1).astype(np.int64), minlength=LENGTH_BINS)


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    width = -CONFIDENCE_MIN / CONFIDENCE_BINS
    index = np.floor((confidence - CONFIDENCE_MIN) / width).astype(np.int64)
    return np.bincount(np.clip(index, 0, CONFIDENCE_BINS - 1), minlength=CONFIDENCE_BINS)


def summarize(table: pa.Table, shard: str, k: int) -> Summary:
    """One batch of caption rows (COLUMNS) -> its Summary; `shard` names the file it came from."""
    failed = pc.is_valid(table["error"])
    ok = table.filter(pc.and_(pc.invert(failed), pc.is_valid(table["log_prob"])))
    bad = table.filter(failed)
    s = Summary(k, rows=table.num_rows, ok=ok.num_rows, failed=bad.num_rows)
    for key, message in zip(bad["image"].to_pylist(), bad["error"].to_pylist()):
        c = error_class(message)
        s.errors[c] = s.errors.get(c, 0) + 1
        if len(s.examples.setdefault(c, [])) < ERROR_EXAMPLES:
            s.examples[c].append((str(key), clean_message(str(message))))
    if not ok.num_rows:
        return s
    tokens = ok["num_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
    conf = ok["log_prob"].to_numpy(zero_copy_only=False).astype(np.float64) / np.maximum(tokens, 1)
    s.length = length_bins(tokens)
    s.confidence = confidence_bins(conf)
    hashes = key_hash(ok["image"])

    def rows(index: np.ndarray) -> list[dict[str, Any]]:
        keys, captions = ok["image"].take(index).to_pylist(), ok["caption"].take(index).to_pylist()
        return [
            {
                "key": str(keys[j]),
                "caption": captions[j] or "",
                "confidence": float(conf[i]),
                "tokens": int(tokens[i]),
                "hash": int(hashes[i]),
                "shard": shard,
            }
            for j, i in enumerate(index)
        ]

    n = min(k, ok.num_rows)
    # argpartition then a sort of k: O(rows) per batch; ties are broken by key in the merge.
    least = np.argpartition(conf, n - 1)[:n] if n < ok.num_rows else np.arange(ok.num_rows)
    sample = np.argpartition(hashes, n - 1)[:n] if n < ok.num_rows else np.arange(ok.num_rows)
    s.least = _smallest(rows(least), ("confidence", "key"), k)
    s.sample = _smallest(rows(sample), ("hash", "key"), k)
    return s


def summarize_files(files: list[str], k: int, storage_cfg: Any) -> Summary:
    """Ray task: the Summary of some output files (their footers' times, the COLUMNS of their rows)."""
    total = Summary(k)
    for uri in files:
        shard = uri.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")]
        fs, path = storage.filesystem(uri, storage_cfg)
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                absent = [c for c in COLUMNS if c not in pf.schema_arrow.names]
                if absent:
                    raise InputError(f"{uri}: no {', '.join(absent)} column: not an output file of capray caption")
                raw = (pf.metadata.metadata or {}).get(progress.STATS_KEY.encode())
                part = Summary(k, files=1)
                if raw:
                    st = json.loads(raw)
                    if st.get("ended"):
                        part.times.append(
                            (shard, float(st["started"]), float(st["ended"]), int(st["rows"]) - int(st["copied"]))
                        )
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
                    part = part.merge(summarize(pa.Table.from_batches([batch]), shard, k))
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read output file {uri}: {e}") from None
        total = total.merge(part)
    return total


# --- thumbnails, read back from the input ------------------------------------------------------


def thumbnail(data: bytes, px: int) -> str:
    """Image bytes -> a `data:image/jpeg;base64,...` URI of at most px x px (EXIF rotation applied)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (px, px))  # JPEG: decode at 1/2..1/8 scale, cheap for big photos
        small = ImageOps.exif_transpose(img).convert("RGB")
        small.thumbnail((px, px))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _tar_members(source: str, keys: set[str], exts: tuple[str, ...], storage_cfg: Any) -> dict[str, bytes]:
    """The image member of each sample `<tar stem>/<base>` in `keys`, streamed (capray.reader's layout)."""
    import tarfile

    from capray.listing import stem

    prefix, found = stem(source), {}
    fs, path = storage.filesystem(source, storage_cfg)
    with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            base, _, ext = member.name.rpartition(".")
            key = f"{prefix}/{base}"
            if member.isfile() and key in keys and f".{ext.lower()}" in exts:
                stream = tar.extractfile(member)
                if stream is not None:
                    found[key] = stream.read()
                if len(found) == len(keys):
                    break
    return found


def _parquet_rows(source: str, keys: set[str], cfg: Config) -> dict[str, bytes]:
    """The bytes of rows `keys` of a Parquet input with image bytes: by `inputs.key_column`, or
    `<file stem>/<row>` when it has none (capray.reader); only the row groups holding them are read."""
    from capray.listing import stem

    col, key_col = cfg.inputs.bytes_column, cfg.inputs.key_column
    fs, path = storage.filesystem(source, cfg.storage)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if key_col in pf.schema_arrow.names:
            names = pf.read(columns=[key_col]).column(0).cast(pa.string()).to_pylist()
            rows = {i: n for i, n in enumerate(names) if n in keys}
        else:
            prefix = f"{stem(source)}/"
            rows = {int(k[len(prefix) :]): k for k in keys if k.startswith(prefix) and k[len(prefix) :].isdigit()}
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        found = {}
        for g in sorted({int(np.searchsorted(starts, i, "right")) - 1 for i in rows}):
            if not 0 <= g < pf.num_row_groups:
                continue
            data = pf.read_row_group(g, columns=[col]).column(0)
            for i, k in rows.items():
                if starts[g] <= i < starts[g + 1]:
                    found[k] = data[i - int(starts[g])].as_py()
    return found


def read_thumbnails(kind: str, source: str, keys: list[str], cfg: Config, px: int) -> dict[str, tuple[str, str]]:
    """Ray task: {key: (data URI, "")} or (key: ("", why)) for some keys of one input shard.
    `kind` and `source` are the shard's in the output's index; a listing's, a manifest's or an
    unknown shard's keys are the images' paths/URIs."""
    from capray.listing import suffixes

    wanted = set(keys)
    data: dict[str, bytes] = {}
    why = ""
    try:
        if kind == "webdataset":
            data = _tar_members(source, wanted, suffixes(cfg.inputs.extensions), cfg.storage)
            why = "no image member of that key in the tar"
        elif kind == "parquet_bytes":
            data = _parquet_rows(source, wanted, cfg)
            why = "no row of that key in the Parquet file"
    except Exception as e:  # noqa: BLE001 (a thumbnail is a placeholder with the reason, never a failed page)
        why = clean_message(f"cannot read {source}: {type(e).__name__}: {e}")
    out: dict[str, tuple[str, str]] = {}
    for key in keys:
        try:
            raw = data.get(key) if kind in ("webdataset", "parquet_bytes") else storage.read_bytes(key, cfg.storage)
            out[key] = (thumbnail(raw, px), "") if raw else ("", why or "empty file")
        except Exception as e:  # noqa: BLE001 (as above)
            out[key] = ("", clean_message(f"{type(e).__name__}: {e}"))
    return out


# --- the driver -----------------------------------------------------------------------------------


def _saved_config(output: str, cfg: Config) -> Config:
    """The job's saved config (for its `inputs` settings) with this command's storage settings
    (a saved config has no credentials); `cfg` itself when the job saved none (killed before its end)."""
    from capray.config import from_yaml, updated

    try:
        saved = from_yaml(storage.read_bytes(storage.join(output, "_capray_config.yaml"), cfg.storage).decode("utf-8"))
    except FileNotFoundError:
        return cfg
    return updated(saved, {"storage": cfg.storage})


def _groups(files: list[str], cpus: int) -> list[list[str]]:
    """Consecutive files in about 4 groups per CPU, MAX_FILES_PER_TASK at most each."""
    size = min(MAX_FILES_PER_TASK, max(1, math.ceil(len(files) / (4 * cpus))))
    return [files[i : i + size] for i in range(0, len(files), size)]


def collect(output: str, cfg: Config, k: int) -> Summary:
    """The Summary of every shard file of `output`, by Ray tasks, merged as they finish."""
    import ray

    files = [storage.join(output, shards.output_name(i)) for i in sorted(shards.done_ids(output, cfg.storage))]
    if files:
        _require_columns(files[0], cfg.storage)  # here, not as a task's error with its traceback
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    task = ray.remote(num_cpus=1)(summarize_files)
    total = Summary(k)
    pending: list[Any] = []
    for group in _groups(files, cpus):
        if len(pending) >= IN_FLIGHT_PER_CPU * cpus:
            done, pending = ray.wait(pending, num_returns=1)
            total = total.merge(ray.get(done[0]))
        pending.append(task.remote(group, k, cfg.storage))
    for ref in pending:
        total = total.merge(ray.get(ref))
    return total


def thumbnails(
    rows: Iterable[dict[str, Any]], entries: dict[str, dict[str, Any]], cfg: Config
) -> dict[str, tuple[str, str]]:
    """{key: (data URI, why not)} for the gallery rows: one Ray task per input shard."""
    import ray

    by_shard: dict[str, list[str]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], [])
        if r["key"] not in by_shard[r["shard"]]:
            by_shard[r["shard"]].append(r["key"])
    task = ray.remote(num_cpus=1)(read_thumbnails)
    cfg_ref = ray.put(cfg)
    refs = []
    for shard, keys in by_shard.items():
        e = entries.get(shard, {})
        refs.append(task.remote(e.get("kind", ""), e.get("source", ""), keys, cfg_ref, cfg.overview.thumbnail_px))
    out: dict[str, tuple[str, str]] = {}
    for part in ray.get(refs):
        out.update(part)
    return out


def read_index(output: str, cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The output's index (capray.shards); InputError when `output` is missing or no job's output."""
    return shards.require_index(output, cfg.storage, "caption")


def _require_columns(uri: str, storage_cfg: Any) -> None:
    """InputError unless output file `uri` has the caption columns (a features folder has not)."""
    fs, path = storage.filesystem(uri, storage_cfg)
    with fs.open_input_file(path) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    absent = [c for c in COLUMNS if c not in names]
    if absent:
        raise InputError(f"{uri}: no {', '.join(absent)} column: not an output file of capray caption")


def build(output: str, cfg: Config, html_uri: str = "") -> dict[str, Any]:
    """Write the page of caption output `output` to `html_uri` (default `overview.html`, else
    `<output>/_status/overview.html`); returns where, and the figures it shows. Ray must be up."""
    t0 = time.time()
    entries, meta = read_index(output, cfg)
    html_uri = html_uri or cfg.overview.html or progress.status_uri(output, PAGE)
    job_cfg = _saved_config(output, cfg)
    k = cfg.overview.gallery
    s = collect(output, cfg, k)
    by_id = {e["id"]: e for e in entries}
    thumbs = thumbnails(s.least + s.sample, by_id, job_cfg)
    page = render(
        s,
        thumbs,
        output=output,
        input_uri=str(meta.get("input", "")),
        plan=sum(1 for e in entries if e["state"] == "current"),
        heartbeat=progress.read_heartbeat(output, cfg.storage),
        settings=meta.get("settings", {}),
    )
    storage.write_bytes(html_uri, page.encode("utf-8"), cfg.storage)
    return {
        "html": html_uri,
        "files": s.files,
        "rows": s.rows,
        "ok": s.ok,
        "failed": s.failed,
        "errors": s.errors,
        "gallery": len(s.least),
        "random": len(s.sample),
        "thumbnails": sum(1 for uri, _ in thumbs.values() if uri),
        "bytes": len(page.encode("utf-8")),
        "seconds": round(time.time() - t0, 2),
    }


def after_job(cfg: Config) -> dict[str, Any]:
    """The page of a caption job that just finished (`overview.after_job`), its path logged."""
    from capray.config import output_paths

    result = build(output_paths(cfg)["captions"], cfg)
    log.info("caption: overview of %d rows -> %s", result["rows"], result["html"])
    return result


def run(output: str, cfg: Config, html_uri: str = "") -> dict[str, Any]:
    """`capray overview`: the folder checked, then Ray started or joined (`ray.address`), the page
    built; InputError when `output` cannot be read or is no caption output."""
    from capray.runtime import init_ray

    try:
        read_index(output, cfg)  # before Ray: a wrong folder is told in a second, not after Ray starts
        init_ray(cfg)
        return build(output, cfg, html_uri)
    except OSError as e:
        raise InputError(f"cannot read {output}: {e}") from None


# --- the page: HTML and inline SVG, no script ------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555}.meta code{word-break:break-all}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{border:1px solid #eee;padding:6px}
svg text{font:11px system-ui,sans-serif;fill:#444}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(172px,1fr));gap:10px}
figure{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa}
figure img,.missing{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.missing{display:flex;align-items:center;justify-content:center;font-size:11px;color:#a00;text-align:center;overflow:hidden}
figcaption .c{font-weight:600}figcaption .k{color:#777;font-size:11px;word-break:break-all}
.err{font-size:12px}.err code{word-break:break-all}
"""


def _fmt_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def bar_svg(values: Iterable[float], labels: list[str], title: str, xlabel: str, ylabel: str, color: str) -> str:
    """A bar chart as inline SVG: `values` one bar each, `labels` under some bars ("" for none)."""
    vals = [float(v) for v in values]
    w, h, left, bottom, top = 540, 210, 52, 34, 22
    n = max(len(vals), 1)
    peak = max(vals, default=0.0) or 1.0
    bw = (w - left - 8) / n
    e = html.escape
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{e(title)}">',
        f'<text x="{left}" y="14" style="font-weight:600">{e(title)}</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - 8}" y2="{h - bottom}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{_num(peak)}</text>',
        f'<text x="{left - 4}" y="{h - bottom}" text-anchor="end">0</text>',
        f'<text x="{(left + w) / 2}" y="{h - 4}" text-anchor="middle">{e(xlabel)}</text>',
        f'<text x="12" y="{(top + h - bottom) / 2}" transform="rotate(-90 12 {(top + h - bottom) / 2})" '
        f'text-anchor="middle">{e(ylabel)}</text>',
    ]
    for i, v in enumerate(vals):
        bh = (h - bottom - top) * v / peak
        x = left + i * bw
        parts.append(
            f'<rect x="{x + 0.5:.1f}" y="{h - bottom - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}" '
            f'fill="{color}"><title>{e(labels[i] if i < len(labels) else "")}: {_num(v)}</title></rect>'
        )
    step = max(1, math.ceil(n / 8))
    for i in range(0, n, step):
        label = labels[i] if i < len(labels) else ""
        parts.append(
            f'<text x="{left + (i + 0.5) * bw:.1f}" y="{h - bottom + 14}" text-anchor="middle">{e(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def throughput_bins(
    times: list[tuple[str, float, float, int]], bins: int = TIME_BINS
) -> tuple[list[float], float, float]:
    """Rows per second over the job's time, from each shard's end time and new rows: (rates per
    bin, first start, last end). A shard's rows count in the bin it ended in."""
    if not times:
        return [], 0.0, 0.0
    t0, t1 = min(t[1] for t in times), max(t[2] for t in times)
    width = max(t1 - t0, 1e-6) / bins
    rows = np.zeros(bins)
    for _, _, end, n in times:
        rows[min(int((end - t0) / width), bins - 1)] += n
    return [float(r / width) for r in rows], t0, t1


def shown(uri: str) -> str:
    """A key or folder as the page shows it: a local path under the current folder relative to it
    (shorter, and the same page wherever the work dir lives), anything else as it is."""
    if storage.is_remote(uri) or not os.path.isabs(uri):
        return uri
    rel = os.path.relpath(uri)
    return uri if rel.startswith("..") else rel


def _gallery(rows: list[dict[str, Any]], thumbs: dict[str, tuple[str, str]]) -> str:
    e = html.escape
    cells = []
    for r in rows:
        uri, why = thumbs.get(r["key"], ("", "not read"))
        img = (
            f'<img src="{uri}" alt="{e(r["caption"])}">'
            if uri
            else f'<div class="missing" title="{e(why)}">no thumbnail: {e(why)}</div>'
        )
        cells.append(
            f'<figure>{img}<figcaption><div class="c">{e(r["caption"])}</div>'
            f"<div>{r['confidence']:.3f} per token, {r['tokens']} tokens</div>"
            f'<div class="k">{e(shown(r["key"]))}</div></figcaption></figure>'
        )
    return '<div class="gallery">' + "".join(cells) + "</div>" if cells else "<p>No captioned rows.</p>"


def render(
    s: Summary,
    thumbs: dict[str, tuple[str, str]],
    output: str,
    input_uri: str,
    plan: int,
    heartbeat: dict[str, Any] | None,
    settings: dict[str, Any],
) -> str:
    """The page: a summary, throughput, errors, the two histograms and the two galleries."""
    e = html.escape
    rates, t0, t1 = throughput_bins(s.times)
    job = "no heartbeat" if not heartbeat else f"{heartbeat['job']} run {heartbeat['run']}: {heartbeat['state']}"
    new_rows = sum(t[3] for t in s.times)
    overall = f"{new_rows / (t1 - t0):,.1f} rows/s over {t1 - t0:,.0f} s" if t1 > t0 else "-"
    time_labels = [f"{(i + 0.5) * (t1 - t0) / max(len(rates), 1):.0f}" for i in range(len(rates))]
    throughput = (
        bar_svg(
            rates,
            time_labels,
            f"Throughput from {_fmt_time(t0)}",
            "seconds since the first shard started",
            "rows/s",
            "#4a7ab7",
        )
        if rates
        else "<p>No shard has stats in its footer (files of an earlier capray).</p>"
    )
    lo = [CONFIDENCE_MIN + i * (-CONFIDENCE_MIN / CONFIDENCE_BINS) for i in range(CONFIDENCE_BINS)]
    conf_labels = [f"{v:.1f}" for v in lo]
    conf_labels[0] = f"<{lo[1]:.1f}"
    len_labels = [str(i) for i in range(LENGTH_BINS - 1)] + [f"{LENGTH_BINS - 1}+"]
    plots = (
        '<div class="plots">'
        f'<div class="plot" id="length">{bar_svg(s.length, len_labels, "Caption length", "tokens (with <end>)", "captions", "#5a9e6f")}</div>'
        f'<div class="plot" id="confidence">{bar_svg(s.confidence, conf_labels, "Confidence", "log-probability per token", "captions", "#c07a3a")}</div>'
        "</div>"
    )
    error_rows = "".join(
        f'<tr><td>{e(c)}</td><td class="n">{n:,}</td><td class="err">'
        + "<br>".join(f"<code>{e(shown(k))}</code>: {e(m)}" for k, m in s.examples.get(c, []))
        + "</td></tr>"
        for c, n in sorted(s.errors.items(), key=lambda kv: -kv[1])
    )
    errors = (
        f'<table id="errors"><tr><th>class</th><th>rows</th><th>examples (key: message)</th></tr>{error_rows}</table>'
        if s.errors
        else "<p>No failed rows.</p>"
    )
    settings_rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(shown(str(v)))}</td></tr>" for k, v in settings.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>capray overview: {e(shown(output))}</title>
<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>
<h1>capray overview</h1>
<div class="meta">output <code>{e(shown(output))}</code><br>input <code>{e(shown(input_uri))}</code><br>
job: {e(job)}; page written {_fmt_time(time.time())}</div>
<h2>Summary</h2>
<table id="summary">
<tr><td>files</td><td class="n">{s.files:,} of {plan:,} shards</td></tr>
<tr><td>rows</td><td class="n">{s.rows:,}</td></tr>
<tr><td>captioned</td><td class="n">{s.ok:,}</td></tr>
<tr><td>failed</td><td class="n">{s.failed:,}</td></tr>
<tr><td>throughput</td><td class="n">{e(overall)}</td></tr>
</table>
<h2>Throughput over time</h2><div class="plot" id="throughput">{throughput}</div>
<h2>Errors by class</h2>{errors}
<h2>Captions</h2>{plots}
<h2>The {len(s.least)} least confident captions</h2>
<section id="least">{_gallery(s.least, thumbs)}</section>
<h2>{len(s.sample)} captions at random</h2>
<section id="random">{_gallery(s.sample, thumbs)}</section>
<h2>Settings</h2><table id="settings">{settings_rows}</table>
</body></html>
"""
