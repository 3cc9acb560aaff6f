"""Evaluation: the standard COCO caption metrics and a report of what the model looks at.

Metrics are pycocoevalcap's (the COCO caption evaluation code): PTB tokenisation, BLEU-1..4,
METEOR, ROUGE-L and CIDEr(-D), every reference of each image used. The tokenizer and METEOR run
on Java; without `java` on PATH METEOR is skipped and captions are tokenised by capray's own
`clean`, and the results say so in `notes`. SPICE is not computed (it downloads CoreNLP models).

The report shows, for a few images, the image, its generated captions, its references and, per
generated word, the 8x8 attention weights upsampled over the 299x299 image the model saw.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from capray.text import clean

# Order of the metrics in tables and JSON.
METRICS = ("exact_match", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
NO_JAVA = (
    "METEOR skipped: no Java (`java` is not on PATH; install a JRE, e.g. apt-get install default-jre-headless); "
    "captions tokenised with capray.text.clean instead of the PTB tokenizer"
)
RANDOM_BACKBONE = (
    "encoder.weights=random: a seeded, untrained InceptionV3 (no ImageNet weights on this machine), "
    "so captions of real photos are not expected to be good"
)


def _norm(caption: str) -> str:
    return " ".join(clean(caption))


def java_available() -> bool:
    """True when a `java` executable is on PATH (pycocoevalcap's tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def coco_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap, all references per image; (scores, notes)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(predictions)
    notes: list[str] = []
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": r} for r in references[k]] for k in keys})
        res = tok.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    else:
        notes.append(NO_JAVA)
        gts = {k: [_norm(r) for r in references[k]] for k in keys}
        res = {k: [_norm(predictions[k])] for k in keys}
    out: dict[str, float] = {}
    # The scorers print their internals to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
        if java:
            out["meteor"] = _meteor(gts, res)
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out, notes


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        # Let the Java process end on EOF now, rather than be killed mid-write at interpreter exit.
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            try:
                meteor.meteor_p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                meteor.meteor_p.kill()


def score(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Exact match (equal to any reference after normalisation) and the COCO metrics, plus `notes`."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} predictions have no references, e.g. {missing[0]}")
    exact = sum(_norm(p) in {_norm(r) for r in references[k]} for k, p in predictions.items())
    metrics, notes = coco_metrics(predictions, references)
    return {"images": len(predictions), "exact_match": exact / len(predictions), **metrics, "notes": notes}


# --- decoding ---------------------------------------------------------------------------------


@dataclass
class Caption:
    """A decoded caption: its text, its words and each word's 64 attention weights (words, 64)."""

    text: str
    words: list[str]
    attention: np.ndarray


class Decoder:
    """Compiled greedy and beam decoding of a checkpoint's model on backbone features."""

    def __init__(self, model: Any, tokenizer: Any, infer_cfg: Any):
        import tensorflow as tf

        self.tokenizer = tokenizer
        steps = (infer_cfg.max_length or tokenizer.max_length) - 1
        k, alpha = infer_cfg.beam_size, infer_cfg.length_alpha
        # Labels as in the caption job's `strategy` column.
        self.labels = {"greedy": "greedy", "beam": f"beam{k}"}
        self._fns = {
            "greedy": tf.function(lambda f: model.greedy(f, steps), reduce_retracing=True),
            "beam": tf.function(lambda f: model.beam_search(f, steps, k, alpha), reduce_retracing=True),
        }

    def __call__(self, strategy: str, features: np.ndarray) -> list[Caption]:
        """Captions of a batch of (B, 64, 2048) features with `greedy` or `beam`."""
        tokens, attention, _, _ = (t.numpy() for t in self._fns[strategy](features))
        return [self._caption(row, att) for row, att in zip(tokens, attention)]

    def _caption(self, tokens: np.ndarray, attention: np.ndarray) -> Caption:
        tk = self.tokenizer
        words, rows = [], []
        # Emitted tokens stop at <end> (which gets no panel: it is not a word of the caption).
        for step, i in enumerate(int(t) for t in tokens):
            if i in (tk.end_id, tk.pad_id):
                break
            words.append(tk.words[i])
            rows.append(attention[step])
        # (words, 64); (0, 64) when the first token is <end>: an empty caption, still scored.
        att = np.asarray(rows, np.float32).reshape(len(rows), attention.shape[-1])
        return Caption(" ".join(words), words, att)


# --- report -----------------------------------------------------------------------------------


def upsample(weights: np.ndarray, size: int) -> np.ndarray:
    """64 attention weights -> the 8x8 grid bilinearly resized to (size, size)."""
    from PIL import Image

    grid = np.asarray(weights, np.float32).reshape(8, 8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))


def attention_figure(pixels: np.ndarray, caption: Caption, columns: int = 5) -> Any:
    """A matplotlib Figure with one panel per generated word: the image under its attention map."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    n = len(caption.words)
    rows, cols = max(1, math.ceil(n / columns)), max(1, min(n, columns))
    fig = Figure(figsize=(1.9 * cols, 2.05 * rows), dpi=72)
    size = pixels.shape[0]
    for j, word in enumerate(caption.words):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(pixels)
        # The colour scale is per panel (where this word looks), as in the TF tutorial's plots.
        ax.imshow(upsample(caption.attention[j], size), cmap="jet", alpha=0.45, extent=(0, size, size, 0))
        ax.set_title(word, fontsize=11)
        ax.axis("off")
    if not n:
        fig.text(0.5, 0.5, "(empty caption: no words)", ha="center", va="center")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.2)
    return fig


def _png(fig: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    # A 256-colour palette makes the files ~3x smaller with no visible loss on these heat maps.
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _image_jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    # JPEG: the input photo is a fifth of its PNG size, which keeps the one-file page small.
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ReportItem:
    """One image of a report: its URI, pixels (299, 299, 3), references and captions by strategy."""

    image: str
    pixels: np.ndarray
    references: list[str]
    captions: dict[str, Caption]


def write_report(out: str, items: Sequence[ReportItem], title: str, notes: Sequence[str] = (),
                 metrics: Mapping[str, Mapping[str, Any]] | None = None, storage_cfg: Any = None) -> dict[str, Any]:
    """PNG attention figures (of each item's first strategy) and one self-contained index.html under `out`."""
    from capray.storage import join, write_bytes

    def uri(data: bytes, kind: str = "png") -> str:
        return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")

    e = html.escape
    parts = [
        "<!doctype html>\n<html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}section{border-top:1px solid #ccc;"
        "padding:8px 0}.row{display:flex;gap:16px}td,th{padding:2px 8px;text-align:right}"
        ".note{background:#fff3cd;padding:6px}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    if metrics:
        labels = list(metrics)
        names = [m for m in METRICS if any(m in metrics[s] for s in labels)]
        parts.append("<table><tr><th>metric</th>" + "".join(f"<th>{e(s)}</th>" for s in labels) + "</tr>")
        for m in names:
            cells = "".join(f"<td>{metrics[s][m]:.4f}</td>" if m in metrics[s] else "<td>-</td>" for s in labels)
            parts.append(f"<tr><th>{m}</th>{cells}</tr>")
        parts.append("</table>")
    files = []
    for i, item in enumerate(items):
        label, shown = next(iter(item.captions.items()))
        png = _png(attention_figure(item.pixels, shown))
        name = f"{i:03d}_attention.png"
        write_bytes(join(out, name), png, storage_cfg)
        files.append(name)
        caps = "".join(f"<li><b>{e(s)}</b>: {e(c.text)}</li>" for s, c in item.captions.items())
        refs = "".join(f"<li>{e(r)}</li>" for r in item.references)
        photo = uri(_image_jpeg(item.pixels), "jpeg")
        parts.append(
            f"<section><h3>{e(item.image.rsplit('/', 1)[-1])}</h3><div class='row'>"
            f"<img src='{photo}' width='299' height='299' alt='input image'>"
            f"<div><p>Generated:</p><ul>{caps}</ul><p>References:</p><ul>{refs}</ul></div></div>"
            f"<p>Attention per generated word ({e(label)}; <code>&lt;end&gt;</code> has no panel):</p>"
            f"<img src='{uri(png)}' alt='attention maps'></section>"
        )
    parts.append("</body></html>\n")
    index = join(out, "index.html")
    write_bytes(index, "\n".join(parts).encode("utf-8"), storage_cfg)
    return {"index": index, "figures": [join(out, f) for f in files]}


def _pixels(image: str, cfg: Any) -> np.ndarray:
    from capray import storage
    from capray.images import decode

    return decode(storage.read_bytes(image, cfg.storage), cfg.data.max_pixels)


# --- jobs -------------------------------------------------------------------------------------


def _notes(train_cfg: Any, metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes = [RANDOM_BACKBONE] if train_cfg.encoder.weights == "random" else []
    for m in metrics.values():
        notes += [n for n in m.get("notes", []) if n not in notes]
    return notes


def evaluate(cfg: Any, checkpoint_uri: str) -> dict[str, Any]:
    """Score `checkpoint_uri` on the validation split with every `evaluate.strategies`; write the
    results JSON next to the checkpoint and the report under `<checkpoint>/report_val/`."""
    from capray import checkpoint
    from capray.config import output_paths
    from capray.data import prepare_split
    from capray.features import decode_features, read_features
    from capray.storage import join, write_bytes

    model, tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, cfg.storage)
    _, val_df = prepare_split(cfg)
    references = val_df.groupby("image")["caption"].apply(list).to_dict()
    decoder = Decoder(model, tokenizer, cfg.infer)
    strategies = list(cfg.evaluate.strategies)
    labels = [decoder.labels[s] for s in strategies]
    # The first N validation images by name: the same images in every report of a run.
    shown = set(sorted(references)[: cfg.evaluate.report_images])
    predictions: dict[str, dict[str, str]] = {label: {} for label in labels}
    report_caps: dict[str, dict[str, Caption]] = {}
    feats = read_features(output_paths(cfg)["features"], cfg.storage).filter(lambda r: r["image"] in references)
    for batch in feats.iter_batches(batch_size=cfg.evaluate.batch_size):
        features = decode_features(batch["features"], batch["dtype"][0])
        for strategy, label in zip(strategies, labels):
            for image, cap in zip(batch["image"], decoder(strategy, features)):
                predictions[label][image] = cap.text
                if image in shown:
                    report_caps.setdefault(image, {})[label] = cap
    if not predictions[labels[0]]:
        raise ValueError(f"no extracted features for any of the {len(references)} validation images: run `capray extract` first")
    metrics = {label: score(predictions[label], references) for label in labels}
    notes = _notes(train_cfg, metrics)
    unscored = len(references) - len(predictions[labels[0]])
    if unscored:
        notes.append(f"{unscored} validation images have no features (extraction failed) and are not scored")
    result = {
        "checkpoint": checkpoint_uri,
        "split": "val",
        "images": len(predictions[labels[0]]),
        "notes": notes,
        "metrics": {label: {k: v for k, v in m.items() if k in METRICS} for label, m in metrics.items()},
    }
    if shown:
        items = [ReportItem(img, _pixels(img, cfg), list(references[img]), report_caps[img]) for img in sorted(report_caps)]
        title = f"capray evaluation: {cfg.name}, validation split ({result['images']} images)"
        result["report"] = write_report(
            join(checkpoint_uri, "report_val"), items, title, notes, result["metrics"], cfg.storage
        )["index"]
    write_bytes(join(checkpoint_uri, "eval_val.json"), json.dumps(result, indent=2).encode("utf-8"), cfg.storage)
    return result


def report_images(cfg: Any, checkpoint_uri: str, images: Sequence[str], references: Mapping[str, Sequence[str]],
                  out: str, title: str) -> dict[str, Any]:
    """A report on images that have no extracted features (e.g. the demo's held-out folder)."""
    from capray import checkpoint
    from capray.model import ImageEncoder

    model, tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, cfg.storage)
    # The backbone must be the one the training features came from.
    encoder = ImageEncoder(train_cfg.encoder.weights, train_cfg.encoder.seed, cfg.storage)
    decoder = Decoder(model, tokenizer, cfg.infer)
    pixels = np.stack([_pixels(img, cfg) for img in images])
    features = encoder(pixels)
    caps = {decoder.labels[s]: decoder(s, features) for s in cfg.evaluate.strategies}
    items = [
        ReportItem(img, pixels[i], list(references[img]), {label: c[i] for label, c in caps.items()})
        for i, img in enumerate(images)
    ]
    notes = [RANDOM_BACKBONE] if train_cfg.encoder.weights == "random" else []
    return write_report(out, items, title, notes, storage_cfg=cfg.storage)


def print_table(result: Mapping[str, Any]) -> None:
    """The metrics as a small table: one row per metric, one column per decoding strategy."""
    labels = list(result["metrics"])
    print(f"[capray] evaluate: {result['split']} split, {result['images']} images, checkpoint {result['checkpoint']}")
    print(f"  {'metric':12s}" + "".join(f"{s:>10s}" for s in labels))
    for m in METRICS:
        if any(m in result["metrics"][s] for s in labels):
            print(f"  {m:12s}" + "".join(f"{result['metrics'][s].get(m, float('nan')):10.4f}" for s in labels))
    for note in result["notes"]:
        print(f"  NOTE: {note}")
    if result.get("report"):
        print(f"  report: {result['report']}")


def run(cfg: Any) -> dict[str, Any]:
    """`capray evaluate`: score the configured (or best) checkpoint on the validation split."""
    from capray.checkpoint import best_checkpoint

    result = evaluate(cfg, best_checkpoint(cfg))
    print_table(result)
    return result
