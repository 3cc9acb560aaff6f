"""Caption metrics: exact match and the standard COCO caption metrics (pycocoevalcap).

PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), every reference of each image used.
The tokenizer and METEOR run on Java; without `java` on PATH METEOR is skipped and captions are
tokenised by capray's own `clean`, and the results say so in `notes`. SPICE is not computed (it
downloads CoreNLP models).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from capray.text import clean

# Order of the metrics in tables and JSON.
METRICS = ("exact_match", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
NO_JAVA = (
    "METEOR skipped: no Java (`java` is not on PATH; install a JRE, e.g. apt-get install default-jre-headless); "
    "captions tokenised with capray.text.clean instead of the PTB tokenizer"
)


def _norm(caption: str) -> str:
    return " ".join(clean(caption))


def java_available() -> bool:
    """True when a `java` executable is on PATH (pycocoevalcap's tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def coco_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], list[str]]:
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
