"""The `capray` command: `capray <job> [config.yaml ...] [key=value ...]` (docs/cli.md).

`capray`, `python -m capray` and the `jobs/*.py` scripts (what `ray job submit` runs) all call
`main`: one code path.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from capray.config import parse_args, to_yaml
from capray.logs import install_cli_handler

# job -> module whose `run(cfg)` performs it
JOBS = {
    "extract": "capray.features",
    "train": "capray.train",
    "caption": "capray.infer",
    "evaluate": "capray.evaluate",
    "demo": "capray.demo",
    "export": "capray.export",
    "audit": "capray.audit",
}
# Jobs that need no Ray: they run in this process.
LOCAL_JOBS = {"export"}

# Failures users cause or meet (bad config or input, missing checkpoint, storage down, a stopped
# job): one line and the exit code of their kind (docs/cli.md), not a traceback. Matched by class
# name over the exception's MRO, so this module need not import the job modules (some load
# TensorFlow); CaptionJobError is a JobError. Anything else is a bug and keeps its traceback (1).
EXIT_CODES = {
    "ConfigError": 2,
    "InputError": 3,
    "DataError": 3,
    "CheckpointError": 4,
    "FeatureError": 5,
    "BackboneError": 6,
    "JobError": 7,
    "TrainingError": 8,
    "ExportError": 9,
    "AuditError": 10,
}


def exit_code(error: BaseException) -> int | None:
    """The exit code for an expected failure (EXIT_CODES), None for anything else."""
    for cls in type(error).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return None


def _output_writable(uri: str) -> None:
    """InputError unless the job could create files in the local folder `uri` (s3:// is not probed)."""
    from capray import storage
    from capray.inputs import InputError

    if storage.is_remote(uri):
        return  # only a write would tell; the job's first shard does that soon enough
    existing = os.path.abspath(uri)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the output folder {uri}: {existing} is not a writable folder")


def _input_exists(uri: str, storage_cfg: Any) -> None:
    from capray import storage
    from capray.inputs import InputError

    # A glob is expanded by the job itself (capray.inputs.plan), which names what it matched.
    if not any(c in uri for c in "*?[") and not storage.exists(uri, storage_cfg):
        raise InputError(f"input not found: {uri}")


def _checkpoint_backbone(cfg: Any) -> None:
    """The checkpoint the job would use is complete, and the backbone it was trained on loads."""
    from capray import backbone, checkpoint, storage
    from capray.config import from_yaml

    uri = checkpoint.best_checkpoint(cfg)
    checkpoint.check(uri, cfg.storage)
    trained = from_yaml(storage.read_bytes(storage.join(uri, "config.yaml"), cfg.storage).decode("utf-8"))
    backbone.check(trained.backbone.weights, cfg.storage)


def preflight(job: str, cfg: Any) -> None:
    """Check in the driver, before Ray starts, what would otherwise fail in every actor or late:
    inputs, output folders, checkpoint, feature store and backbone weights (fetched into the cache)."""
    from capray import backbone, storage
    from capray.config import output_paths
    from capray.inputs import InputError

    p = output_paths(cfg)
    if job == "extract":
        if cfg.extract.input:
            _input_exists(cfg.extract.input, cfg.storage)
        elif cfg.data.format != "synthetic" and not storage.exists(p["split"], cfg.storage):
            from capray.data import DataError

            if not cfg.data.annotations:
                raise DataError(f"data.annotations is empty: give the {cfg.data.format} captions file")
            if not storage.exists(cfg.data.annotations, cfg.storage):
                raise DataError(f"data.annotations: file not found: {cfg.data.annotations}")
        _output_writable(p["features"])
        backbone.check(cfg.backbone.weights, cfg.storage)
    elif job == "caption":
        if not cfg.caption.input:
            raise InputError(
                "caption.input is empty: give a folder, s3:// prefix, manifest(s), .tar shards or Parquet files to caption"
            )
        _input_exists(cfg.caption.input, cfg.storage)
        _output_writable(p["captions"])
        _checkpoint_backbone(cfg)
    elif job == "train":
        from capray.featurestore import FeatureError

        if not storage.exists(p["features"], cfg.storage):
            raise FeatureError(f"no features at {p['features']}: run `capray extract` with the same config first")
        _output_writable(p["runs"])
    elif job == "evaluate":
        _checkpoint_backbone(cfg)
    elif job == "export":
        from capray.export import check_output

        check_output(cfg.output, cfg.storage, cfg.export.overwrite)
        _output_writable(cfg.output)
        _checkpoint_backbone(cfg)
    elif job == "demo":
        _output_writable(cfg.work_dir)
        backbone.check(cfg.backbone.weights, cfg.storage)
    elif job == "audit":
        _audit_target(cfg)


def _audit_target(cfg: Any) -> None:
    """The input and the output folder of the job `audit.job` names exist."""
    from capray import storage
    from capray.config import output_paths
    from capray.inputs import InputError

    p = output_paths(cfg)
    if cfg.audit.job == "caption":
        if not cfg.caption.input:
            raise InputError("caption.input is empty: give the input of the caption job to audit")
        _input_exists(cfg.caption.input, cfg.storage)
        output = p["captions"]
    else:
        if cfg.extract.input:
            _input_exists(cfg.extract.input, cfg.storage)
        elif not storage.exists(p["split"], cfg.storage):
            # The extract job's input is then the split it saved: without it there is nothing to compare.
            raise InputError(f"no training split at {p['split']}: run `capray extract` with the same config first")
        output = p["features"]
    if not storage.exists(output, cfg.storage):
        raise InputError(f"output folder not found: {output}: nothing to audit (run `capray {cfg.audit.job}` first)")


def run_job(job: str, cfg: Any) -> Any:
    """Run one job on the Ray that is already connected; `train` is followed by `evaluate` when
    `evaluate.after_train`, `caption` and `extract` by their audit when `audit.after_job`
    (composition lives here, not in the job modules)."""
    result = importlib.import_module(JOBS[job]).run(cfg)
    if job in ("caption", "extract") and cfg.audit.after_job:
        # Here, not in the jobs: capray.audit imports both jobs' planners (job_plan).
        result["audit"] = importlib.import_module("capray.audit").after_job(cfg, job)
    if job == "train" and cfg.evaluate.after_train:
        # Imported here: the evaluation job loads what only this path needs.
        evaluate = importlib.import_module("capray.evaluate")
        result["evaluation"] = evaluate.evaluate(cfg, result["checkpoint"])
        evaluate.print_table(result["evaluation"])
    return result


def main(argv: Sequence[str] | None = None, job: str | None = None) -> int:
    """Parse `[job] [config ...] [overrides]`, check, start Ray, run the job; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="capray", description=__doc__.splitlines()[0])
    if job is None:
        parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("config", nargs="*", help="YAML files (later ones win), then key=value overrides")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="extract, caption: redo the output folder (a new input or other settings); export: replace it",
    )
    parser.add_argument("--limit", type=int, help="extract, caption: at most N new shards (a trial run)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print capray's debug messages and the traceback of expected failures too (or set CAPRAY_DEBUG=1)",
    )
    args = parser.parse_args(argv)
    job = job or args.job
    debug = args.debug or os.environ.get("CAPRAY_DEBUG", "") not in ("", "0")
    # capray's records print as `[capray] ...` lines on stdout (capray.logs); the root handler is
    # for the other libraries' warnings and errors, whose INFO records are not this job's news.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    restore_logging = install_cli_handler(logging.DEBUG if debug else logging.INFO)
    try:
        overwrite = {"export": "export.overwrite=true", "caption": "caption.overwrite=true"}.get(
            job, "extract.overwrite=true"
        )
        extra = ([overwrite] if args.overwrite else []) + ([f"inputs.limit_shards={args.limit}"] if args.limit else [])
        cfg = parse_args(args.config + extra)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        import capray
        from capray.runtime import init_ray

        # Which code runs matters on a cluster (uploaded working dir vs. the installed wheel).
        print(
            f"[capray] {job}: capray {capray.__version__} from {os.path.dirname(os.path.abspath(capray.__file__))}",
            flush=True,
        )
        if job not in ("evaluate", "export", "audit"):
            from capray.config import cpu_bf16

            print(
                f"[capray] {job}: model.precision={cfg.model.precision} (this machine's CPU: "
                f"{cpu_bf16() or 'no BF16 instructions'})",
                flush=True,
            )
        preflight(job, cfg)
        if job not in LOCAL_JOBS:
            init_ray(cfg)
        run_job(job, cfg)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise  # a bug: the traceback is what a developer needs
        if debug:
            traceback.print_exc()
        # Its message says what to do; the class name says which kind (and exit code) it is.
        print(f"capray {job}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return code
    finally:
        # `main` called in-process (tests, a notebook) leaves the caller's logging as it was.
        restore_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
