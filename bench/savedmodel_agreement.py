"""How often an exported SavedModel's captions equal the caption job's, on the same images.

Runs without capray (plain TensorFlow, pyarrow): what a deployment has. Loads the SavedModel with
`tf.saved_model.load`, captions every image the caption job's Parquet output lists (its `image`
column holds local paths), and prints the agreement and the images that differ.

Usage: python bench/savedmodel_agreement.py SAVEDMODEL_DIR CAPTIONS_PARQUET_DIR [--batch-size 32]
Prints one JSON line last: {"images": N, "agree": K, "agreement": K / N, "differ": [...]}.
"""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow.parquet as pq
import tensorflow as tf


def main() -> None:
    """Caption the job's images with the SavedModel and compare."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("savedmodel")
    ap.add_argument("captions")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    rows = pq.read_table(args.captions, columns=["image", "caption", "error"]).to_pylist()
    rows = sorted((r for r in rows if r["error"] is None), key=lambda r: r["image"])
    serve = tf.saved_model.load(args.savedmodel).signatures["serving_default"]
    differ = []
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i : i + args.batch_size]
        blobs = tf.constant([tf.io.read_file(r["image"]).numpy() for r in batch])
        captions = [c.decode("utf-8") for c in serve(images=blobs)["caption"].numpy()]
        differ += [
            {"image": r["image"], "job": r["caption"], "savedmodel": c}
            for r, c in zip(batch, captions)
            if c != r["caption"]
        ]
    agree = len(rows) - len(differ)
    for d in differ[:10]:
        print(f"differs: {d['image']}: job {d['job']!r}, SavedModel {d['savedmodel']!r}")
    print(
        json.dumps(
            {
                "images": len(rows),
                "agree": agree,
                "agreement": agree / max(len(rows), 1),
                "differ": differ,
                "capray_imported": "capray" in sys.modules,
            }
        )
    )


if __name__ == "__main__":
    main()
