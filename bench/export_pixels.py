"""How far the exported SavedModel's in-graph decode + resize is from capray's own, in pixels.

Compares `capray.images.decode` (PIL: JPEG draft mode, bilinear resize) with the graph's
`capray.export._pixels` (tf.io.decode_jpeg with the accurate IDCT, antialiased bilinear resize),
and with TensorFlow's default (fast) IDCT, on the same JPEGs.

Usage: python bench/export_pixels.py [--images DIR] [--limit N]
Default images: the Flickr8k dev sample's images (real JPEGs). Prints mean and max |difference|.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev" / "images"


def main() -> None:
    """Print the pixel differences, the graph's decoding and TF's default against capray's."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--limit", type=int, default=40)
    args = ap.parse_args()
    from capray.export import _pixels
    from capray.images import decode
    from capray.model import tf

    paths = sorted(glob.glob(os.path.join(args.images, "*.jpg")))[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")

    def default_idct(data: bytes) -> np.ndarray:
        img = tf.image.resize(tf.io.decode_jpeg(data, channels=3), (299, 299), method="bilinear", antialias=True)
        return tf.round(tf.clip_by_value(img, 0.0, 255.0)).numpy()

    rows = {"graph (accurate IDCT)": [], "TF default IDCT": []}
    for p in paths:
        data = Path(p).read_bytes()
        ours = decode(data, 10**9).astype(np.float32)
        for name, theirs in (
            ("graph (accurate IDCT)", _pixels(tf.constant(data)).numpy()),
            ("TF default IDCT", default_idct(data)),
        ):
            rows[name].append(np.abs(ours - theirs))
    print(f"{len(paths)} JPEGs from {args.images}: |capray.images.decode - in-graph| in grey levels (0-255)")
    for name, diffs in rows.items():
        print(f"  {name:22s} mean {np.mean([d.mean() for d in diffs]):.3f}  max {max(d.max() for d in diffs):.0f}")
    # Decoding alone, before any resize: PIL against both IDCTs.
    from PIL import Image

    for dct in ("INTEGER_ACCURATE", ""):
        diffs = []
        for p in paths:
            data = Path(p).read_bytes()
            with Image.open(p) as img:
                pil = np.asarray(img.convert("RGB"), np.float32)
            diffs.append(np.abs(pil - tf.io.decode_jpeg(data, channels=3, dct_method=dct).numpy()))
        label = f"decode only, {dct or 'TF default'} IDCT vs PIL"
        print(f"  {label:22s} mean {np.mean([d.mean() for d in diffs]):.3f}  max {max(d.max() for d in diffs):.0f}")


if __name__ == "__main__":
    main()
