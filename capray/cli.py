"""The `capray` command: `capray <job> [config.yaml ...] [key=value ...]` (docs/cli.md).

`capray`, `python -m capray` and the `jobs/*.py` scripts (what `ray job submit` runs) all call
`main`: one code path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from capray.config import parse_args, to_yaml
from capray.logs import install_cli_handler
from capray.runner import JOBS, run

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


def one_line(command: str, error: BaseException) -> int | None:
    """An expected failure's exit code, after its one line on stderr: its message says what to do,
    its class name which kind (and exit code) it is. None, and nothing printed, for a bug."""
    code = exit_code(error)
    if code is not None:
        print(f"{command}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    return code


def output_argument(parser: argparse.ArgumentParser, output: str | None) -> str:
    """The OUTPUT of `capray status` / `capray overview`: the folder itself, or `output=FOLDER` as
    the jobs take it; a config file or another override in its place is named (exit code 2)."""
    usage = f"give the job's output folder first: {parser.prog} OUTPUT [config.yaml ...] [key=value ...]"
    if not output:
        parser.error(usage)
    key, eq, value = output.partition("=")
    if eq and key == "output":
        return value
    if eq and "/" not in key and ":" not in key:
        parser.error(f"{output!r} is an override: {usage}")
    if output.endswith((".yaml", ".yml")):
        parser.error(f"{output!r} is a config file: {usage}")
    return output


def status_main(argv: list[str]) -> int:
    """`capray status OUTPUT [config ...] [key=value ...] [--json]`: no Ray, nothing written."""
    import json

    parser = argparse.ArgumentParser(prog="capray status", description="how far a caption or extract job is")
    parser.add_argument(
        "output", nargs="?", metavar="OUTPUT", help="the job's output folder (captions or features), local or s3://"
    )
    parser.add_argument("config", nargs="*", help="YAML files and key=value overrides (storage.*, status.*)")
    parser.add_argument("--json", action="store_true", help="one JSON object (docs/cli.md#status)")
    args = parser.parse_intermixed_args(argv)
    args.output = output_argument(parser, args.output)
    try:
        from capray.status import lines, run

        cfg = parse_args(args.config)
        s = run(args.output, cfg.storage, cfg.status.stale_periods)
    except Exception as e:
        code = one_line("capray status", e)
        if code is None:
            raise
        return code
    print(json.dumps(s, indent=1) if args.json else "\n".join(lines(s)), flush=True)
    return 0


def overview_main(argv: list[str]) -> int:
    """`capray overview OUTPUT [config ...] [key=value ...] [--html FILE]`: Ray tasks read the
    output, the page is written (docs/cli.md#overview)."""
    parser = argparse.ArgumentParser(
        prog="capray overview", description="a caption output as one self-contained HTML page"
    )
    parser.add_argument(
        "output", nargs="?", metavar="OUTPUT", help="the caption job's output folder, local or s3:// gs:// az://"
    )
    parser.add_argument("config", nargs="*", help="YAML files and key=value overrides (storage.*, overview.*, ray.*)")
    parser.add_argument("--html", default="", help="the page's file (default <output>/_status/overview.html)")
    args = parser.parse_intermixed_args(argv)
    args.output = output_argument(parser, args.output)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    restore_logging = install_cli_handler(logging.INFO)
    try:
        from capray.overview import run as overview

        cfg = parse_args(args.config)
        r = overview(args.output, cfg, args.html)
    except Exception as e:
        code = one_line("capray overview", e)
        if code is None:
            raise
        return code
    finally:
        restore_logging()
    print(
        f"[capray] overview: {r['rows']} rows in {r['files']} files ({r['ok']} captioned, {r['failed']} failed), "
        f"{r['gallery']} least confident + {r['random']} random captions, {r['thumbnails']} thumbnails; "
        f"{r['seconds']} s -> {r['html']}",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None, job: str | None = None) -> int:
    """Parse `[job] [config ...] [overrides]`, check, start Ray, run the job; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if job == "status" or (job is None and argv[:1] == ["status"]):
        return status_main(argv[1:] if job is None else argv)
    if job == "overview" or (job is None and argv[:1] == ["overview"]):
        return overview_main(argv[1:] if job is None else argv)
    parser = argparse.ArgumentParser(prog="capray", description=__doc__.splitlines()[0])
    if job is None:
        parser.add_argument("job", choices=sorted([*JOBS, "status", "overview"]))
    parser.add_argument("config", nargs="*", help="YAML files (later ones win), then key=value overrides")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="extract, caption: redo the output folder (a new input or other settings); export: replace it",
    )
    parser.add_argument("--limit", type=int, help="extract, caption: at most N new shards (a trial run)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="extract, caption: print the plan (shards, rows, done, an estimate) and exit without work",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print capray's debug messages and the traceback of expected failures too (or set CAPRAY_DEBUG=1)",
    )
    args = parser.parse_intermixed_args(argv)
    job = job or args.job
    debug = args.debug or os.environ.get("CAPRAY_DEBUG", "") not in ("", "0")
    # capray's records print as `[capray] ...` lines on stdout (capray.logs); the root handler is
    # for the other libraries' warnings and errors, whose INFO records are not this job's news.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    restore_logging = install_cli_handler(logging.DEBUG if debug else logging.INFO)
    try:
        overwrite = {
            "export": "export.overwrite=true",
            "caption": "caption.overwrite=true",
            "extract": "extract.overwrite=true",
        }.get(job)
        if args.overwrite and overwrite is None:
            parser.error(f"--overwrite applies to extract, caption and export, not {job}")
        if args.limit and job not in ("extract", "caption"):
            parser.error(f"--limit applies to extract and caption, not {job}")
        if args.dry_run and job not in ("extract", "caption"):
            parser.error(f"--dry-run applies to extract and caption, not {job}")
        extra = (
            ([overwrite] if args.overwrite else [])
            + ([f"inputs.limit_shards={args.limit}"] if args.limit else [])
            + (["inputs.dry_run=true"] if args.dry_run else [])
        )
        cfg = parse_args(args.config + extra)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        import capray

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
        run(job, cfg)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise  # a bug: the traceback is what a developer needs
        if debug:
            traceback.print_exc()
        one_line(f"capray {job}", e)
        return code
    finally:
        # `main` called in-process (tests, a notebook) leaves the caller's logging as it was.
        restore_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
