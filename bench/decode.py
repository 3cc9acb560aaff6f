"""Benchmark: image decode ms/image, full JPEG decode vs libjpeg's DCT scaling (draft mode).

capray.images.decode is the one decode both jobs share: bytes -> (299, 299, 3) uint8. For a JPEG
at least twice the target size on both sides it asks libjpeg for a 1/2, 1/4 or 1/8 scale decode
first (`draft=True`, the default); `draft=False` is the full decode. This script times both on

  originals   the shared Flickr8k photos (~500x375: draft is a no-op there, by design)
  12 MP       the same photos upscaled to 4000x3000 and saved at JPEG quality 90 (phone size)

one core, one thread, and prints ms/image, the speed-up, and how far the draft pixels are from
the full decode (mean and max absolute difference, 0-255). Goal: >= 4x on the 12 MP files.

  python bench/decode.py [--images DIR] [--count 40]

DIR defaults to the Flickr8k development photos beside the repository (../shared/data/flickr8k-dev/images).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from capray.images import decode

MAX_PIXELS = 64_000_000


def upscale(data: bytes, size: tuple[int, int] = (4000, 3000), quality: int = 90) -> bytes:
    """A phone-sized JPEG made from a photo."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue()


def time_decode(files: list[bytes], draft: bool, rounds: int = 3) -> float:
    """Best-of-`rounds` ms per image for decoding every file once."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for data in files:
            decode(data, MAX_PIXELS, draft=draft)
        best = min(best, (time.perf_counter() - start) / len(files) * 1000)
    return best


def main() -> None:
    """Time full vs draft decoding on the originals and their 12 MP versions; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev" / "images"
    ap.add_argument("--images", type=Path, default=default)
    ap.add_argument("--count", type=int, default=40)
    args = ap.parse_args()
    paths = sorted(args.images.glob("*.jpg"))[: args.count]
    if not paths:
        raise SystemExit(f"no .jpg files in {args.images}: pass --images DIR")
    originals = [p.read_bytes() for p in paths]
    large = [upscale(d) for d in originals]
    print(
        f"{len(paths)} photos from {args.images.name}/; 12 MP versions: 4000x3000, quality 90, "
        f"{np.mean([len(d) for d in large]) / 1e6:.1f} MB each on average"
    )
    print(f"{'set':12s} {'full ms':>8s} {'draft ms':>9s} {'speed-up':>9s} {'mean |diff|':>12s} {'max |diff|':>11s}")
    for name, files in (("originals", originals), ("12 MP", large)):
        full, draft = time_decode(files, False), time_decode(files, True)
        diffs = [
            np.abs(decode(d, MAX_PIXELS).astype(int) - decode(d, MAX_PIXELS, draft=False).astype(int)) for d in files
        ]
        mean, worst = float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))
        print(f"{name:12s} {full:8.2f} {draft:9.2f} {full / draft:8.1f}x {mean:12.2f} {worst:11d}")
        print(f"{'':12s} -> one core decodes {1000 / draft:.0f} images/s ({name}, draft)")


if __name__ == "__main__":
    main()
