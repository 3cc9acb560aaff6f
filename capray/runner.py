"""Running a job: the checks before any Ray work, Ray, the job, and what follows it.

The one place that composes jobs, below both faces of capray: the `capray` command (capray.cli,
which parses arguments, prints and maps failures to exit codes) and the Python API (capray.api).
Job modules never import each other; what runs after a job (the evaluation after training, the
audit after an image job) is decided here.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capray.schema import Config

# job -> module whose `run(cfg)` performs it
JOBS = {
    "extract": "capray.extraction",
    "train": "capray.train",
    "caption": "capray.captioning",
    "evaluate": "capray.evaluate",
    "demo": "capray.demo",
    "export": "capray.export",
    "audit": "capray.audit",
}
# Jobs that need no Ray: they run in this process.
LOCAL_JOBS = {"export"}


def _output_writable(uri: str, what: str = "the output folder") -> None:
    """InputError unless the job could create files in the local folder `uri` (object storage is not probed)."""
    from capray import storage
    from capray.inputs import InputError

    if storage.is_remote(uri):
        return  # only a write would tell; the job's first shard does that soon enough
    existing = os.path.abspath(uri)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {uri}: {existing} is not a writable folder")
    # os.access says yes to root everywhere, and knows nothing of read-only mounts or of /proc:
    # a file created and removed in the nearest existing folder tells, before Ray starts.
    try:
        tempfile.TemporaryFile(dir=existing, prefix=".capray-probe-").close()
    except OSError as e:
        raise InputError(f"cannot write {what} {uri}: {existing} takes no new file ({e.strerror or e})") from None


def _checkpoint_backbone(cfg: Config) -> None:
    """The checkpoint the job would use is complete, and the backbone it was trained on loads."""
    from capray import backbone, checkpoint, storage
    from capray.config import from_yaml

    uri = checkpoint.best_checkpoint(cfg)
    checkpoint.check(uri, cfg.storage)
    trained = from_yaml(storage.read_bytes(storage.join(uri, "config.yaml"), cfg.storage).decode("utf-8"))
    backbone.check(trained.backbone.weights, cfg.storage)


def preflight(job: str, cfg: Config) -> None:
    """Check in the driver, before Ray starts, what would otherwise fail in every actor or late:
    inputs, output folders, checkpoint, feature store and backbone weights (fetched into the cache)."""
    from capray import backbone, inputs, storage
    from capray.config import output_paths

    p = output_paths(cfg)
    if job == "extract":
        if cfg.extract.input:
            inputs.require(cfg.extract.input, cfg)
        elif cfg.data.format != "synthetic" and not storage.exists(p["split"], cfg.storage):
            from capray.data import require_annotations

            require_annotations(cfg)
        _output_writable(p["features"])
        if cfg.extract.overwrite:
            from capray.shards import check_clearable

            check_clearable(p["features"], {"extract.input": cfg.extract.input}, cfg.storage, "extract.overwrite")
        backbone.check(cfg.backbone.weights, cfg.storage)
    elif job == "caption":
        from capray.captioning import require_input

        require_input(cfg)
        inputs.require(cfg.caption.input, cfg)
        _output_writable(p["captions"])
        _output_writable(cfg.work_dir, "the work_dir (input listings)")
        if cfg.caption.overwrite:
            from capray.captioning import overwrite_keeps
            from capray.shards import check_clearable

            keeps = overwrite_keeps(cfg, cfg.caption.input, cfg.checkpoint)
            check_clearable(p["captions"], keeps, cfg.storage, "caption.overwrite")
        _checkpoint_backbone(cfg)
    elif job == "train":
        from capray.config import check_training
        from capray.featurestore import FeatureError

        check_training(cfg)

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
        from capray.config import check_training

        check_training(cfg)
        _output_writable(cfg.work_dir)
        backbone.check(cfg.backbone.weights, cfg.storage)
    elif job == "audit":
        _audit_target(cfg)


def _audit_target(cfg: Config) -> None:
    """The input and the output folder of the job `audit.job` names exist."""
    from capray import inputs, storage
    from capray.config import output_paths
    from capray.inputs import InputError

    p = output_paths(cfg)
    if cfg.audit.job == "caption":
        if not cfg.caption.input:
            raise InputError("caption.input is empty: give the input of the caption job to audit")
        inputs.require(cfg.caption.input, cfg)
        output = p["captions"]
    else:
        if cfg.extract.input:
            inputs.require(cfg.extract.input, cfg)
        elif not storage.exists(p["split"], cfg.storage):
            # The extract job's input is then the split it saved: without it there is nothing to compare.
            raise InputError(f"no training split at {p['split']}: run `capray extract` with the same config first")
        output = p["features"]
    if not storage.exists(output, cfg.storage):
        raise InputError(f"output folder not found: {output}: nothing to audit (run `capray {cfg.audit.job}` first)")


def run_job(job: str, cfg: Config) -> Any:
    """Run one job on the Ray that is already connected; `train` is followed by `evaluate` when
    `evaluate.after_train`, `caption` and `extract` by their audit when `audit.after_job`,
    `caption` by its overview page when `overview.after_job` (composition lives here, not in the
    job modules)."""
    result = importlib.import_module(JOBS[job]).run(cfg)
    if job in ("caption", "extract") and cfg.audit.after_job and not cfg.inputs.dry_run:
        # Here, not in the jobs: capray.audit imports both jobs' planners (job_plan).
        result["audit"] = importlib.import_module("capray.audit").after_job(cfg, job)
    if job == "caption" and cfg.overview.after_job and not cfg.inputs.dry_run:
        result["overview"] = importlib.import_module("capray.overview").after_job(cfg)
    if job == "train" and cfg.evaluate.after_train:
        # Imported here: the evaluation job loads what only this path needs.
        evaluate = importlib.import_module("capray.evaluate")
        result["evaluation"] = evaluate.evaluate(cfg, result["checkpoint"])
        evaluate.log_table(result["evaluation"])
    return result


def run(job: str, cfg: Config) -> Any:
    """`capray <job>` after parsing: the checks (`preflight`), Ray (unless the job needs none), the
    job and what follows it (`run_job`); returns the job's summary."""
    from capray.runtime import init_ray

    preflight(job, cfg)
    if job not in LOCAL_JOBS:
        init_ray(cfg)
    return run_job(job, cfg)
