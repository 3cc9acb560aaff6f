"""Caption metrics: exact match and the standard COCO caption metrics (pycocoevalcap).

PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), every reference of each image used.
The tokenizer and METEOR run on Java; without `java` on PATH METEOR is skipped and captions are
tokenised by capray's own `caption_words`, and the results say so in `notes`. SPICE is not computed (it
downloads CoreNLP models).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from capray.text import caption_words

# Order of the metrics in tables and JSON.
METRICS = ("exact_match", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
NO_JAVA = (
    "METEOR skipped: no Java (`java` is not on PATH; install a JRE, e.g. apt-get install default-jre-headless); "
    "captions tokenised with capray.text.caption_words instead of the PTB tokenizer"
)


def _norm(caption: str) -> str:
    return " ".join(caption_words(caption))


def java_available() -> bool:
    """True when a `java` executable is on PATH (pycocoevalcap's tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def coco_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap, all references per image; (scores, notes)."""
    scores, notes = coco_metrics_of({"": predictions}, references)
    return scores[""], notes


def coco_metrics_of(
    predictions: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """`coco_metrics` of several sets of predictions of the same images (one per decoding strategy):
    the references and every set are tokenised in one Java run, and one METEOR process scores every
    set, since starting METEOR's Java (its paraphrase tables) costs ~7 s of CPU each time."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notes: list[str] = []
    java = java_available()
    if java:
        gts_all, tokenized = _ptb_tokenize(predictions, references)
    else:
        notes.append(NO_JAVA)
        gts_all = {k: [_norm(r) for r in references[k]] for k in references}
        tokenized = {label: {k: [_norm(p[k])] for k in sorted(p)} for label, p in predictions.items()}
    meteor = _Meteor() if java else None
    out: dict[str, dict[str, float]] = {}
    try:
        for label, res in tokenized.items():
            gts = {k: gts_all[k] for k in res}
            scores: dict[str, float] = {}
            # The scorers print their internals to stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                bleu, _ = Bleu(4).compute_score(gts, res)
                scores.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
                if meteor is not None:
                    scores["meteor"] = meteor.score(gts, res)
                scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
                scores["cider"] = float(Cider().compute_score(gts, res)[0])
            out[label] = scores
    finally:
        if meteor is not None:
            meteor.close()
    return out, notes


def _ptb_tokenize(
    predictions: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
    """The references and every set of predictions through pycocoevalcap's PTB tokenizer in one
    call, so one Java process: the tokenizer works line by line, so each caption gets the tokens a
    call of its own would give it."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    merged: dict[tuple[str, ...], list[dict[str, str]]] = {
        ("references", k): [{"caption": r} for r in refs] for k, refs in references.items()
    }
    for label, p in predictions.items():
        merged.update({("predictions", label, k): [{"caption": p[k]}] for k in sorted(p)})
    tokens = PTBTokenizer().tokenize(merged)
    gts = {k: tokens[("references", k)] for k in references}
    res = {label: {k: tokens[("predictions", label, k)] for k in sorted(p)} for label, p in predictions.items()}
    return gts, res


class _Meteor:
    """pycocoevalcap's METEOR process, started on first use and ended cleanly by `close`."""

    def __init__(self) -> None:
        self._meteor: Any = None

    def score(self, gts: dict, res: dict) -> float:
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return float(self._meteor.compute_score(gts, res)[0])

    def close(self) -> None:
        meteor = self._meteor
        if meteor is None:
            return
        # Let the Java process end on EOF now, rather than be killed mid-write at interpreter exit.
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            try:
                meteor.meteor_p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                meteor.meteor_p.kill()


def score(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Exact match (equal to any reference after normalisation) and the COCO metrics, plus `notes`."""
    return score_of({"": predictions}, references)[""]


def score_of(
    predictions: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """`score` of each set of predictions (e.g. one per decoding strategy), scored together."""
    for p in predictions.values():
        if not p:
            raise ValueError("no predictions to score")
        missing = [k for k in p if k not in references]
        if missing:
            raise KeyError(f"{len(missing)} predictions have no references, e.g. {missing[0]}")
    metrics, notes = coco_metrics_of(predictions, references)
    out = {}
    for label, p in predictions.items():
        exact = sum(_norm(c) in {_norm(r) for r in references[k]} for k, c in p.items())
        out[label] = {"images": len(p), "exact_match": exact / len(p), **metrics[label], "notes": notes}
    return out
