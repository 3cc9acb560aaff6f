"""Caption metrics: exact match and BLEU (pycocoevalcap's reference implementation)."""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

from capray.text import clean


def _norm(caption: str) -> str:
    return " ".join(clean(caption))


def bleu(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[float]:
    """Corpus BLEU-1..4 with all references of each image (pycocoevalcap's scorer)."""
    from pycocoevalcap.bleu.bleu import Bleu

    keys = sorted(predictions)
    res = {k: [_norm(predictions[k])] for k in keys}
    gts = {k: [_norm(r) for r in references[k]] for k in keys}
    # The scorer prints its internals to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        scores, _ = Bleu(4).compute_score(gts, res)
    return [float(s) for s in scores]


def score(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match (prediction equals any reference after normalisation) and BLEU-1..4."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} predictions have no references, e.g. {missing[0]}")
    exact = sum(_norm(p) in {_norm(r) for r in references[k]} for k, p in predictions.items())
    b = bleu(predictions, references)
    return {"images": len(predictions), "exact_match": exact / len(predictions), **{f"bleu{i + 1}": b[i] for i in range(4)}}


def evaluate_split(cfg, checkpoint_uri: str) -> dict[str, float]:
    """Greedy captions for the validation split's images (from their extracted features), scored."""
    import tensorflow as tf

    from capray import checkpoint
    from capray.config import output_paths
    from capray.data import prepare_split
    from capray.features import decode_features, read_features

    model, tokenizer, _, _ = checkpoint.load(checkpoint_uri, cfg.storage)
    _, val_df = prepare_split(cfg)
    references = val_df.groupby("image")["caption"].apply(list).to_dict()
    greedy = tf.function(lambda f: model.greedy(f, tokenizer.max_length - 1), reduce_retracing=True)
    predictions: dict[str, str] = {}
    feats = read_features(output_paths(cfg)["features"], cfg.storage).filter(lambda r: r["image"] in references)
    for batch in feats.iter_batches(batch_size=64):
        tokens = greedy(decode_features(batch["features"], batch["dtype"][0]))[0].numpy()
        predictions.update(zip(batch["image"], (tokenizer.decode(t) for t in tokens)))
    return score(predictions, references)


def run(cfg) -> dict[str, float]:
    """`capray evaluate`: score the configured (or best) checkpoint on the validation split."""
    import json

    from capray.storage import join, write_bytes
    from capray.train import best_checkpoint

    uri = best_checkpoint(cfg)
    metrics = evaluate_split(cfg, uri)
    write_bytes(join(uri, "eval_val.json"), json.dumps(metrics, indent=2).encode("utf-8"), cfg.storage)
    print("[capray] evaluate (validation split, greedy):")
    for k, v in metrics.items():
        print(f"  {k:12s} {v:.4f}" if isinstance(v, float) else f"  {k:12s} {v}")
    return metrics
