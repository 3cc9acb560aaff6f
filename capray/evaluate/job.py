"""`capray evaluate`: score a checkpoint on the validation split's extracted features with every
`evaluate.strategies`, write the results JSON and a report next to the checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from capray.evaluate.metrics import METRICS, score_of
from capray.evaluate.report import ReportItem, write_report

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)

RANDOM_BACKBONE = (
    "backbone.weights=random: a seeded, untrained InceptionV3 (no ImageNet weights on this machine), "
    "so captions of real photos are not expected to be good"
)


def _pixels(image: str, cfg: Config) -> np.ndarray:
    from capray import storage
    from capray.images import decode

    return decode(storage.read_bytes(image, cfg.storage), cfg.data.max_pixels)


def _notes(train_cfg: Any, metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes = [RANDOM_BACKBONE] if train_cfg.backbone.weights == "random" else []
    for m in metrics.values():
        notes += [n for n in m.get("notes", []) if n not in notes]
    return notes


def evaluate(cfg: Config, checkpoint_uri: str) -> dict[str, Any]:
    """Score `checkpoint_uri` on the validation split with every `evaluate.strategies`; write the
    results JSON next to the checkpoint and the report under `<checkpoint>/report_val/`."""
    from capray import checkpoint
    from capray.config import output_paths
    from capray.data import load_side, prepare_split
    from capray.decoder import Decoder
    from capray.featurestore import decode_features, read_features
    from capray.storage import exists, join, read_bytes, write_bytes

    model, tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, cfg.storage)
    # The validation captions only: O(validation captions) in the driver, whatever the training set.
    val_df = load_side(prepare_split(cfg), cfg.storage, "val")
    references = val_df.groupby("image")["caption"].apply(list).to_dict()
    decoders = [Decoder.from_config(model, tokenizer, cfg.caption, s) for s in cfg.evaluate.strategies]
    labels = [d.label for d in decoders]
    # The first N validation images by name: the same images in every report of a run.
    shown = set(sorted(references)[: cfg.evaluate.report_images])
    predictions: dict[str, dict[str, str]] = {label: {} for label in labels}
    report_caps: dict[str, dict[str, Any]] = {}
    feats = read_features(output_paths(cfg)["features"], cfg.storage).filter(lambda r: r["image"] in references)
    for batch in feats.iter_batches(batch_size=cfg.evaluate.batch_size):
        features = decode_features(batch["features"], batch["dtype"][0])
        for decoder in decoders:
            label = decoder.label
            for image, cap in zip(batch["image"], decoder(features)):
                predictions[label][image] = cap.text
                if image in shown:
                    report_caps.setdefault(image, {})[label] = cap
    if not predictions[labels[0]]:
        raise ValueError(
            f"no extracted features for any of the {len(references)} validation images: run `capray extract` first"
        )
    metrics = score_of(predictions, references)
    notes = _notes(train_cfg, metrics)
    unscored = len(references) - len(predictions[labels[0]])
    if unscored:
        notes.append(f"{unscored} validation images have no features (extraction failed) and are not scored")
    result: dict[str, Any] = {
        "checkpoint": checkpoint_uri,
        "split": "val",
        "images": len(predictions[labels[0]]),
        "notes": notes,
        "metrics": {label: {k: v for k, v in m.items() if k in METRICS} for label, m in metrics.items()},
    }
    if shown:
        items = [
            ReportItem(img, _pixels(img, cfg), list(references[img]), report_caps[img]) for img in sorted(report_caps)
        ]
        title = f"capray evaluation: {cfg.name}, validation split ({result['images']} images)"
        # The run's loss curves, written next to the checkpoint when training ended.
        curves = join(checkpoint_uri, "loss.png")
        loss_png = read_bytes(curves, cfg.storage) if exists(curves, cfg.storage) else None
        result["report"] = write_report(
            join(checkpoint_uri, "report_val"), items, title, notes, result["metrics"], cfg.storage, loss_png
        )["index"]
    write_bytes(join(checkpoint_uri, "eval_val.json"), json.dumps(result, indent=2).encode("utf-8"), cfg.storage)
    return result


def report_images(
    cfg: Config,
    checkpoint_uri: str,
    images: Sequence[str],
    references: Mapping[str, Sequence[str]],
    out: str,
    title: str,
) -> dict[str, Any]:
    """A report on images that have no extracted features (e.g. the demo's held-out folder)."""
    from capray import checkpoint
    from capray.decoder import Decoder
    from capray.model import Backbone

    model, tokenizer, train_cfg, _ = checkpoint.load(checkpoint_uri, cfg.storage)
    # The backbone must be the one the training features came from.
    backbone = Backbone(train_cfg.backbone.weights, train_cfg.backbone.seed, cfg.storage)
    pixels = np.stack([_pixels(img, cfg) for img in images])
    features = backbone(pixels)
    decoders = [Decoder.from_config(model, tokenizer, cfg.caption, s) for s in cfg.evaluate.strategies]
    caps = {d.label: d(features) for d in decoders}
    items = [
        ReportItem(img, pixels[i], list(references[img]), {label: c[i] for label, c in caps.items()})
        for i, img in enumerate(images)
    ]
    notes = [RANDOM_BACKBONE] if train_cfg.backbone.weights == "random" else []
    return write_report(out, items, title, notes, storage_cfg=cfg.storage)


def log_table(result: Mapping[str, Any]) -> None:
    """The metrics as a small table: one row per metric, one column per decoding strategy (logged
    at INFO as one record)."""
    labels = list(result["metrics"])
    lines = [f"evaluate: {result['split']} split, {result['images']} images, checkpoint {result['checkpoint']}"]
    lines.append(f"  {'metric':12s}" + "".join(f"{s:>10s}" for s in labels))
    for m in METRICS:
        if any(m in result["metrics"][s] for s in labels):
            lines.append(f"  {m:12s}" + "".join(f"{result['metrics'][s].get(m, float('nan')):10.4f}" for s in labels))
    lines += [f"  NOTE: {note}" for note in result["notes"]]
    if result.get("report"):
        lines.append(f"  report: {result['report']}")
    log.info("\n".join(lines))


def run(cfg: Config) -> dict[str, Any]:
    """`capray evaluate`: score the configured (or best) checkpoint on the validation split."""
    from capray.checkpoint import best_checkpoint

    result = evaluate(cfg, best_checkpoint(cfg))
    log_table(result)
    return result
