"""The `capray` command: `capray <job> [config.yaml] [key=value ...]`.

The `jobs/*.py` entry points call the same `main`, so `python jobs/train.py configs/demo.yaml`,
`ray job submit -- python jobs/train.py ...` and `capray train ...` are one code path.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from capray.config import ConfigError, parse_args, to_yaml

# job -> module whose `run(cfg)` performs it
JOBS = {
    "extract": "capray.features",
    "train": "capray.train",
    "caption": "capray.infer",
    "evaluate": "capray.evaluate",
    "demo": "capray.demo",
}


# Failures users cause or meet (bad input, unreachable storage, a stopped job): one clear line and
# exit code 1, not a traceback.
EXPECTED = {"InputError", "JobError", "DataError", "CheckpointError", "FeatureError", "TrainingError", "BackboneError"}


def main(argv: Sequence[str] | None = None, job: str | None = None) -> int:
    """Parse `[job] [config] [overrides]`, start Ray, run the job; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="capray", description=__doc__.splitlines()[0])
    if job is None:
        parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("config", nargs="*", help="optional YAML file, then key=value overrides")
    parser.add_argument("--overwrite", action="store_true", help="extract: recompute features already present")
    parser.add_argument("--limit", type=int, help="extract, caption: at most N new shards (a trial run)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    job = job or args.job
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        extra = (["extract.overwrite=true"] if args.overwrite else []) + ([f"inputs.limit_shards={args.limit}"] if args.limit else [])
        cfg = parse_args(args.config + extra)
    except ConfigError as e:
        print(f"capray: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    import capray
    from capray.runtime import init_ray

    # Which code runs matters on a cluster (uploaded working dir vs. the installed wheel).
    print(f"[capray] {job}: capray {capray.__version__} from {os.path.dirname(os.path.abspath(capray.__file__))}", flush=True)
    if job != "evaluate":
        from capray.config import cpu_bf16

        print(f"[capray] {job}: model.precision={cfg.model.precision} (this machine's CPU: "
              f"{cpu_bf16() or 'no BF16 instructions'})", flush=True)
    init_ray(cfg)
    try:
        importlib.import_module(JOBS[job]).run(cfg)
    except Exception as e:
        if not any(c.__name__ in EXPECTED for c in type(e).__mro__):
            raise  # a bug: the traceback is what a developer needs
        # An expected failure (bad input, storage down, ...): its message says what to do.
        print(f"capray {job}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
