"""Two-worker training with everything on S3 (features, split, tokenizer, checkpoints, curves), and
the caption job reading its checkpoint back from S3: what the `jobs_on_s3` run left in the bucket.
(The same on Google Cloud Storage and Azure Blob, under mixed precision: tests/test_precision.py.)"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow.fs import FileSelector

from capray import checkpoint, storage
from capray.config import output_paths
from capray.images import decode
from capray.model import Backbone
from capray.train import curves


def test_two_workers_checkpoint_to_s3_and_reload_decodes_identically(jobs_on_s3) -> None:
    cfg = jobs_on_s3.config()
    p = output_paths(cfg)
    console = jobs_on_s3.console.decode(errors="replace")
    assert f"[capray] train: best checkpoint {p['best_checkpoint']}" in console, console[-3000:]
    for name in (*checkpoint.REQUIRED, "optimizer.npz"):
        assert storage.exists(f"{p['best_checkpoint']}/{name}", cfg.storage), name
    fs, runs = storage.filesystem(f"{p['runs']}/{cfg.name}", cfg.storage)
    kept = [i.base_name for i in fs.get_file_info(FileSelector(runs)) if i.base_name.startswith("checkpoint_2")]
    assert len(kept) == 2  # train.num_to_keep default: the last 2 epochs
    # Rank 0's TensorBoard events, uploaded to S3 after every report: one value per epoch and tag.
    assert {tag: len(points) for tag, points in curves.read(p["tensorboard"], cfg.storage).items()} == {
        t: 2 for t in curves.TAGS
    }
    assert storage.read_bytes(f"{p['best_checkpoint']}/loss.png", cfg.storage).startswith(b"\x89PNG")

    # The caption job (its model rebuilt from the S3 checkpoint inside a Ray actor) and a model
    # rebuilt here from the same files decode every held-out image identically.
    captions_fs, captions = storage.filesystem(p["captions"], cfg.storage)
    rows = pd.read_parquet(captions, filesystem=captions_fs).set_index("image")
    model, tokenizer, train_cfg, _ = checkpoint.load(p["best_checkpoint"], cfg.storage)
    encoder = Backbone(train_cfg.backbone.weights, train_cfg.backbone.seed)
    names = sorted(glob.glob(str(jobs_on_s3.root / "heldout" / "images" / "*.jpg")))
    assert len(names) == 4 and sorted(rows.index) == names
    pixels = np.stack([decode(Path(n).read_bytes(), cfg.data.max_pixels) for n in names])
    tokens = model.greedy(
        encoder(pixels), tokenizer.max_length - 1, start_id=tokenizer.start_id, end_id=tokenizer.end_id
    )[0].numpy()
    assert [tokenizer.decode(t) for t in tokens] == [rows.loc[n, "caption"] for n in names]
