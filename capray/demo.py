"""`make demo` / `capray demo`: the whole system end to end on the built-in synthetic dataset.

generate scenes -> extract features (Ray Data actors) -> train (Ray Train, 2 workers,
MultiWorkerMirroredStrategy) -> caption an unseen folder (Ray Data) -> Parquet -> score (COCO metrics) -> attention report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from capray import captioning, evaluate, extraction, synthetic, train
from capray.config import output_paths, updated

if TYPE_CHECKING:
    from capray.schema import Config


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage on local Ray and print the summary (rows, accuracy, COCO metrics, report, examples)."""
    if cfg.data.format != "synthetic":
        raise ValueError("the demo runs on the built-in synthetic dataset (data.format=synthetic)")
    start = time.time()
    p = output_paths(cfg)
    heldout = Path(p["heldout"]).resolve()
    if not (heldout / "captions.csv").exists():
        # Another seed: these scenes were never seen in training or validation.
        synthetic.generate(heldout, cfg.data.synthetic_heldout, seed=cfg.data.synthetic_seed + 1, prefix="heldout")
    extraction.run(cfg)
    trained = train.run(cfg)
    # The caption job's own config, derived rather than written into `cfg`: every stage's config
    # is what it was given, and the one saved next to the captions says what ran.
    # The held-out captions are redone every time: they are this run's checkpoint's to score, and
    # the caption job refuses an output folder made with another checkpoint.
    caption_cfg = updated(
        cfg, {"checkpoint": trained["checkpoint"], "caption": {"input": str(heldout / "images"), "overwrite": True}}
    )
    cap = captioning.run(caption_cfg)

    rows = pd.read_parquet(p["captions"])
    refs = pd.read_csv(heldout / "captions.csv")
    references = {str(heldout / "images" / name): [c] for name, c in zip(refs["image"], refs["caption"])}
    predictions = {r.image: r.caption for r in rows.itertuples() if pd.isna(r.error)}
    metrics = evaluate.score(predictions, references)
    shown = sorted(predictions)[: cfg.evaluate.report_images]
    report = None
    if shown:
        report = evaluate.report_images(
            caption_cfg,
            caption_cfg.checkpoint,
            shown,
            references,
            str(Path(cfg.work_dir) / "reports" / "heldout"),
            f"capray demo: held-out synthetic scenes (unseen seed), first {len(shown)} of {len(predictions)}",
        )["index"]
    minutes = (time.time() - start) / 60

    # Printed, not logged: this table is what `capray demo` (a CLI job only, not in capray.api)
    # is run for, and it is the same whatever the caller's logging.
    print("\n================ capray demo summary ================")
    if cfg.backbone.weights == "random":
        print("NOTE: backbone.weights=random - a seeded, untrained InceptionV3 (no ImageNet download here);")
        print("      the synthetic scenes are learnable from its features, real photos are not.")
    print(f"rows written          {len(rows)} ({cap['failed']} failed) -> {p['captions']}")
    print(f"held-out images       {metrics['images']} (unseen seed)")
    print(f"exact-match accuracy  {metrics['exact_match']:.1%}")
    print(f"BLEU-4                {metrics['bleu4']:.4f}")
    for name, key in (("METEOR", "meteor"), ("ROUGE-L", "rouge_l"), ("CIDEr", "cider")):
        if key in metrics:
            print(f"{name:22s}{metrics[key]:.4f}")
    for note in metrics["notes"]:
        print(f"NOTE: {note}")
    if report:
        print(f"report                {report}")
    print(f"best checkpoint       {caption_cfg.checkpoint}")
    print("examples:")
    for r in rows.sort_values("image").head(3).itertuples():
        truth = references[r.image][0]
        print(f"  {Path(r.image).name}: {r.caption!r} (truth: {truth!r})")
    print(f"total time            {minutes:.1f} min")
    return {"metrics": metrics, "rows": len(rows), "report": report, "minutes": minutes}
