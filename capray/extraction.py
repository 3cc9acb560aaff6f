"""Feature extraction job: images -> InceptionV3 (64, 2048) features as sharded Parquet.

Pipeline (capray.pipeline): input shards -> InceptionV3 in an actor pool (model built once per
actor; `num_gpus` per actor on GPU clusters) -> one Parquet file per shard, in the feature
store's format (capray.featurestore: schema, file list, readers).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from capray import inputs, pipeline, shards, storage
from capray.batch_model import ImageBatchModel
from capray.featurestore import FEATURE_SHAPE, SCHEMA, FeatureError, read_file_list, write_file_list
from capray.inputs import Plan
from capray.schema import BackboneConfig, DataConfig, ExtractConfig, ModelConfig

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)


class FeatureExtractor(ImageBatchModel):
    """Ray Data callable class: images -> InceptionV3 feature rows, the backbone built once per actor.

    The extract job's actor, and a building block for your own Ray Data pipelines:

        ds.map_batches(capray.FeatureExtractor, fn_constructor_kwargs={"weights": "imagenet"},
                       batch_size=16, concurrency=2, num_gpus=1)

    on a dataset with an `image` column of image bytes or URIs (`image_column=` names another),
    or a `pixels` column. Rows in the feature store's format (capray.featurestore: `features` raw
    bytes of a (64, 2048) array of `dtype`; `featurestore.decode_features` reads them back),
    then the batch's other columns.
    """

    def __init__(
        self,
        weights: str = BackboneConfig.weights,
        seed: int = BackboneConfig.seed,
        storage: Any = None,
        dtype: str = ExtractConfig.dtype,
        precision: str = ModelConfig.precision,
        jit_compile: bool = ModelConfig.jit_compile,
        image_column: str = "image",
        max_pixels: int = DataConfig.max_pixels,
    ):
        from capray.model import Backbone, gpu_memory_growth, set_precision  # TF in the actor, not the driver

        gpu_memory_growth()
        set_precision(precision)
        self.storage_cfg, self.image_column, self.max_pixels = storage, image_column, max_pixels
        self.backbone = Backbone(weights, seed, storage, jit_compile=jit_compile, dtype=dtype)
        self.dtype = np.dtype(dtype)

    @staticmethod
    def arguments(cfg: Config) -> dict[str, Any]:
        """Constructor arguments from a job config (its backbone, extract, model, data and storage sections)."""
        return dict(
            weights=cfg.backbone.weights,
            seed=cfg.backbone.seed,
            storage=cfg.storage,
            dtype=cfg.extract.dtype,
            precision=cfg.model.precision,
            jit_compile=cfg.model.jit_compile,
            max_pixels=cfg.data.max_pixels,
        )

    def rows(self, keys: list[str | None], pixels: np.ndarray, errors: list[str]) -> pa.Table:
        """One feature row per image; an image with an error gets the error and empty features."""
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(ok)
        feats = self.backbone(pixels[ok]) if ok.any() else np.zeros((0, *FEATURE_SHAPE), self.dtype)
        return pa.table(
            {
                "image": keys,
                "features": features_column(feats, ok),
                "dtype": [self.dtype.name] * n,
                "shape": [list(FEATURE_SHAPE)] * n,
                "error": [e or None for e in errors],
            },
            schema=SCHEMA,
        )


def features_column(feats: np.ndarray, ok: np.ndarray) -> pa.Array:
    """The binary `features` column over the backbone's output buffer, without a copy per row:
    row i holds the next (64, 2048) array if ok[i], else b"" (an error row)."""
    feats = np.ascontiguousarray(feats)
    row_bytes = feats[0].nbytes if len(feats) else 0
    offsets = np.concatenate([[0], np.cumsum(ok.astype(np.int64) * row_bytes)])
    if offsets[-1] >= 2**31:  # the binary column's int32 offsets: ~8,000 float16 rows per batch
        raise ValueError(
            f"a batch of {len(ok)} feature rows ({offsets[-1]} bytes) exceeds 2 GiB: lower extract.batch_size"
        )
    return pa.Array.from_buffers(
        pa.binary(), len(ok), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(feats)]
    )


def settings(cfg: Config) -> dict[str, Any]:
    """What the features depend on besides the input: recorded with every shard, compared on re-runs."""
    out: dict[str, Any] = {
        "backbone.weights": cfg.backbone.weights,
        "extract.dtype": cfg.extract.dtype,
        "model.precision": cfg.model.precision,
        "data.max_pixels": cfg.data.max_pixels,
    }
    if cfg.backbone.weights == "random":
        out["backbone.seed"] = cfg.backbone.seed
    return out


def job_plan(cfg: Config) -> Plan:
    """The extract job's input as shards: `extract.input`, or the images of the training split
    (chunked from `split.parquet` by a Ray task: the driver never holds the image list)."""
    from capray.config import output_paths, updated

    paths = output_paths(cfg)
    if cfg.extract.input:
        return inputs.plan(cfg, cfg.extract.input, paths["inputs"], paths["features"])
    from capray.data import prepare_split
    from capray.synthetic import ensure

    if cfg.data.format == "synthetic":
        cfg = updated(cfg, {"data": {"annotations": ensure(cfg)}})
    prepare_split(cfg)
    return inputs.names_plan(paths["split"], "image", paths["inputs"], cfg, "split")


def extract(cfg: Config, images: list[str] | Plan, features_dir: str) -> dict[str, Any]:
    """Extract features for `images` (URIs, or a plan of any input kind) into `features_dir`,
    one file per shard; shards already there are skipped unless `extract.overwrite`."""
    if cfg.extract.overwrite and not cfg.inputs.dry_run:
        shards.clear(features_dir, {"extract.input": cfg.extract.input}, cfg.storage, "extract.overwrite")
    file_list = read_file_list(features_dir, cfg.storage)
    if file_list and file_list["dtype"] != cfg.extract.dtype:
        # Training decodes a batch with one dtype; never mix them in one folder.
        raise FeatureError(
            f"{features_dir} holds {file_list['dtype']} features but extract.dtype={cfg.extract.dtype}: "
            "use the same dtype, another work_dir, or --overwrite"
        )
    from capray.config import output_paths

    plan = (
        images if isinstance(images, Plan) else inputs.images_plan(images, output_paths(cfg)["inputs"], cfg, "images")
    )
    kwargs = FeatureExtractor.arguments(cfg)
    s = pipeline.run(
        cfg,
        plan,
        features_dir,
        FeatureExtractor,
        kwargs,
        cfg.extract,
        SCHEMA,
        "extract",
        compression=cfg.extract.compression,
        settings=settings(cfg),
    )
    if s.get("dry_run"):
        return s
    s.update(skipped=s["already_done"], extracted=s["written"] - s["failed"])
    if (
        s["shards_written"]
        or s["cleanup"]["replaced"]
        or s["cleanup"]["pruned"]
        or s["cleanup"]["legacy_removed"]
        or not file_list
    ):
        s["file_list"] = write_file_list(features_dir, cfg.storage, cfg.extract.dtype, file_list, s["files"])
    return s


def run(cfg: Config) -> dict[str, Any]:
    """`capray extract`: features of every image of the split (train and validation), or of
    `extract.input` (any input kind, its columns passed through)."""
    from capray.config import output_paths, save_next_to

    out = output_paths(cfg)["features"]
    plan = job_plan(cfg)
    what = cfg.extract.input or f"{plan.rows} images of the split"
    log.info(f"extracting InceptionV3 features of {what} -> {out} (backbone.weights={cfg.backbone.weights})")
    summary = extract(cfg, plan, out)
    if summary.get("dry_run"):
        for line in pipeline.plan_lines("extract", summary["plan"]):
            log.info(line)
        return summary
    if storage.exists(out, cfg.storage):
        save_next_to(cfg, out)
    log.info(
        f"extract: {summary['shards']} shards, {summary['shards_done_before']} already done "
        f"({summary['skipped']} images); {summary['extracted']} extracted, {summary['failed']} failed "
        "(rows with `error` set in the features files); "
        f"{summary['seconds']} s, {summary['images_per_s']} images/s"
    )
    for key, err in summary["errors"][:5]:
        log.warning("extract: failed: %s: %s", key, err)
    for line in pipeline.report_lines("extract", summary):
        log.info(line)
    return summary
