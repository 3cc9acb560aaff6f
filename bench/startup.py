"""Benchmark: what a caption actor pays before its steady state, step by step, in one process.

The steps of `capray.captioning.CaptionPredictor.__init__` and its first batch, timed one after the
other (a Ray actor runs the same steps, plus its process start):

  import      `import tensorflow, keras` in a fresh interpreter (a subprocess, so it is cold)
  backbone    InceptionV3 built (random weights: the cost of the graph, not of a download)
  checkpoint  the captioning model rebuilt and its weights loaded
  first call  the backbone's first batch (trace + graph optimisation + the batch) vs. a later one
  decoder     the greedy decoder's first batch vs. a later one
  decode      JPEG bytes -> 299x299 pixels per image (the decoding tasks' share of the CPU)

Each step's wall time and CPU time (its threads together; on 2 cores the forward pass uses both).
`ONEDNN_MAX_CPU_ISA=AVX2` before the command limits oneDNN's kernels to AVX2, the widest vectors of
the machines without AVX-512. `--precision` and `--jit-compile` build the backbone as
`model.precision` and `model.jit_compile` do in the jobs: with XLA the first batch also compiles
the whole InceptionV3.

Usage: python bench/startup.py [--checkpoint DIR] [--images DIR] [--batch-size 16]
                               [--precision float32|mixed_float16|mixed_bfloat16] [--jit-compile]
Default checkpoint: outputs/demo/runs/demo/best (run `make demo` first).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caption import parse_args  # bench/caption.py: the same command line


def _cpu() -> float:
    """CPU-s used so far by this process and its ended children (the cold import's subprocess)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args), print its wall time and CPU time, return its result."""
    start, cpu = time.perf_counter(), _cpu()
    out = fn(*args)
    print(f"{label:34s} {time.perf_counter() - start:6.2f} s  {_cpu() - cpu:6.2f} CPU-s", flush=True)
    return out


def options(ap: argparse.ArgumentParser) -> None:
    """This benchmark's own options, beside the caption benchmarks' command line."""
    ap.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    ap.add_argument("--jit-compile", action="store_true", help="compile the backbone with XLA")


def main() -> None:
    """Time each start-up step of a caption actor."""
    args, paths = parse_args(__doc__, options)
    # The child inherits KERAS_BACKEND and TF_CPP_MIN_LOG_LEVEL, set by `import capray` via caption.py.
    cold_import = [sys.executable, "-c", "import tensorflow, keras"]
    timed("import tensorflow, keras (cold)", lambda: subprocess.run(cold_import, check=True))

    import numpy as np
    import tensorflow as tf

    from capray import checkpoint
    from capray.images import decode
    from capray.model import FEATURE_DIM, NUM_CELLS, Backbone, set_precision

    data = [Path(p).read_bytes() for p in paths]
    start = time.perf_counter()
    pixels = np.stack([decode(d, 64_000_000) for d in data])
    print(f"{'decode (per image)':34s} {1000 * (time.perf_counter() - start) / len(data):6.2f} ms", flush=True)
    batch = pixels[: args.batch_size]

    set_precision(args.precision)  # before any layer is built, as an actor does
    print(f"precision {args.precision}, jit_compile {args.jit_compile}", flush=True)
    backbone = timed("backbone built", lambda: Backbone("random", jit_compile=args.jit_compile))
    model, tokenizer, _, _ = timed("checkpoint loaded", checkpoint.load, args.checkpoint)
    features = timed("backbone first batch", backbone, batch)
    timed("backbone later batch", backbone, batch)
    spec = tf.TensorSpec([None, NUM_CELLS, FEATURE_DIM], tf.float32)
    greedy = tf.function(
        lambda f: model.greedy(f, tokenizer.max_length - 1, start_id=tokenizer.start_id, end_id=tokenizer.end_id),
        input_signature=[spec],
    )
    timed("greedy decoder first batch", greedy, features)
    timed("greedy decoder later batch", greedy, features)


if __name__ == "__main__":
    main()
