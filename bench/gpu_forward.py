"""Benchmark: InceptionV3 forward throughput on one accelerator, to size GPU nodes.

Measures images/s and ms/batch of a jitted `keras.applications.InceptionV3` forward
(include_top=False, weights=None, 299x299x3) under the Keras JAX backend, for each dtype
policy (float32, mixed_float16, mixed_bfloat16) and batch size (32, 64, 128, 256). Each
timed step includes the uint8 -> float preprocessing (x / 127.5 - 1), as the extraction job
does; the uint8 batch is already on the device, so host-to-device copy and JPEG decode are
not counted. Random weights: throughput does not depend on their values.

Usage:
  python bench/gpu_forward.py                 # full sweep; well under 5 minutes on an H100
  python bench/gpu_forward.py --quick         # tiny sweep, for a CPU-only sanity check
  python bench/gpu_forward.py --batches 64 256 --precisions mixed_bfloat16 --iters 50

Needs jax and keras 3 (no TensorFlow). Prints one row per (precision, batch).
"""

from __future__ import annotations

import os

# Must precede the first keras import: the backend is fixed at import time, and the
# project's own default (tensorflow) is absent on the GPU machines.
os.environ["KERAS_BACKEND"] = "jax"

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BATCHES = (32, 64, 128, 256)
IMAGE_SHAPE = (299, 299, 3)


def build_forward(policy: str) -> tuple[Callable[..., Any], list[Any], list[Any], str]:
    """Build a fresh InceptionV3 under `policy`; return a jitted forward, its variables, compute dtype."""
    keras.backend.clear_session()
    keras.mixed_precision.set_dtype_policy(policy)
    model = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=IMAGE_SHAPE)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(trainable: list[Any], non_trainable: list[Any], pixels: jax.Array) -> jax.Array:
        """uint8 NHWC batch -> InceptionV3 feature map."""
        # Same scaling as keras.applications.inception_v3.preprocess_input; the model's first
        # layer casts to the policy's compute dtype itself.
        x = pixels.astype(jnp.float32) / 127.5 - 1.0
        y, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return y

    return forward, trainable, non_trainable, model.dtype_policy.compute_dtype


def executable_bytes(compiled: Any) -> int | None:
    """Device bytes the compiled forward needs (arguments + outputs + temporaries), if XLA says."""
    try:
        stats = compiled.memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (memory_analysis is optional per platform and version)
        return None


def time_config(policy: str, batch: int, warmup: int, iters: int, rounds: int, state: tuple) -> dict[str, Any]:
    """Warm up, then time `rounds` x `iters` forwards of one batch size; return the row."""
    forward, trainable, non_trainable, compute_dtype = state
    rng = np.random.default_rng(batch)
    pixels = jax.device_put(rng.integers(0, 256, size=(batch, *IMAGE_SHAPE), dtype=np.uint8))

    # Compile ahead of time once, so XLA's memory analysis costs no second compile.
    start = time.perf_counter()
    compiled = forward.lower(trainable, non_trainable, pixels).compile()
    out = compiled(trainable, non_trainable, pixels)
    out.block_until_ready()
    first_s = time.perf_counter() - start  # compile + autotune + first step
    for _ in range(max(warmup - 1, 0)):
        compiled(trainable, non_trainable, pixels).block_until_ready()

    round_ms = []
    for _ in range(rounds):
        # Block once per round, not per step: a feeding pipeline keeps the device queue full,
        # and per-step syncs would add host dispatch gaps that a real job does not have.
        start = time.perf_counter()
        for _ in range(iters):
            out = compiled(trainable, non_trainable, pixels)
        out.block_until_ready()
        round_ms.append((time.perf_counter() - start) * 1000.0 / iters)

    ms = statistics.median(round_ms)
    exe = executable_bytes(compiled)
    return {
        "precision": policy,
        "compute": compute_dtype,
        "batch": batch,
        "images_s": batch * 1000.0 / ms,
        "ms_batch": ms,
        "ms_min": min(round_ms),
        "ms_max": max(round_ms),
        "first_s": first_s,
        "out": f"{tuple(out.shape)} {out.dtype}",
        "exe_mib": None if exe is None else exe / 2**20,
    }


def format_row(r: dict[str, Any]) -> str:
    """One aligned table line."""
    mem = "-" if r["exe_mib"] is None else f"{r['exe_mib']:.0f}"
    return (
        f"{r['precision']:<15} {r['compute']:<8} {r['batch']:>5} {r['images_s']:>10.1f} {r['ms_batch']:>9.2f}"
        f" {r['ms_min']:>8.2f} {r['ms_max']:>8.2f} {r['first_s']:>8.1f} {mem:>8}  {r['out']}"
    )


def peak_device_mib() -> float | None:
    """Allocator peak on device 0 over the whole run (GPU only), in MiB."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20
    except Exception:  # noqa: BLE001  (CPU devices do not report memory stats)
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sweep (batch 2, 2 iters) for a CPU sanity check")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="timed steps per round (default 20; quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, median reported (default 3; quick 1)")
    args = ap.parse_args(argv)
    batches = args.batches or ([2] if args.quick else list(BATCHES))
    iters = args.iters or (2 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1 if args.quick and args.warmup == 3 else args.warmup

    dev = jax.devices()[0]
    print(
        f"python {sys.version.split()[0]}  jax {jax.__version__}  keras {keras.__version__}  backend {keras.backend.backend()}"
    )
    print(f"devices: {jax.devices()}  kind: {dev.device_kind}  platform: {dev.platform}")
    print(f"warmup {warmup}, {rounds} round(s) x {iters} timed steps per config; ms/batch = median round")
    print("exe_MiB: XLA's arguments+outputs+temporaries for the compiled forward; first_s: compile + first step\n")
    header = (
        f"{'precision':<15} {'compute':<8} {'batch':>5} {'images/s':>10} {'ms/batch':>9}"
        f" {'ms_min':>8} {'ms_max':>8} {'first_s':>8} {'exe_MiB':>8}  output"
    )
    print(header)
    print("-" * len(header), flush=True)

    total = time.perf_counter()
    for policy in args.precisions:
        state = build_forward(policy)
        for batch in batches:
            print(format_row(time_config(policy, batch, warmup, iters, rounds, state)), flush=True)
    keras.mixed_precision.set_dtype_policy("float32")

    peak = peak_device_mib()
    print(f"\npeak device memory (allocator, whole run): {'n/a' if peak is None else f'{peak:.0f} MiB'}")
    print(f"total wall time: {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
