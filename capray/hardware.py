"""What this machine can run, decided once where the config is loaded: the precision policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capray.schema import Config


def cpu_bf16() -> str:
    """The BF16 instruction set of this machine's CPU (`amx_bf16`, `avx512_bf16`), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell here, so no BF16 claim
        return ""
    return next((name for name in ("amx_bf16", "avx512_bf16") if name in flags), "")


def resolve_precision(cfg: Config) -> str:
    """`model.precision` with `auto` decided (GPUs in the job, then this machine's CPU)."""
    if cfg.model.precision != "auto":
        return cfg.model.precision
    if cfg.ray.use_gpu or cfg.extract.num_gpus > 0 or cfg.caption.num_gpus > 0:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_bf16() else "float32"
