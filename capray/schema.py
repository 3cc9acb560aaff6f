"""The config schema: every key, its type, its default and its meaning, in one place.

OmegaConf structured dataclasses; `docs/configuration.md` is generated from them
(`python -m capray.configdoc`). Defaults live here and only here. Loading, layering and
validation are in `capray.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """Which captions/images to use and how to sample and split them."""

    # synthetic | coco | flickr | table
    format: str = "synthetic"
    # coco: captions_*.json; flickr: captions.csv (image,caption) or the token file (Flickr8k.token.txt); table: CSV/Parquet with image,caption columns.
    annotations: str = ""
    # Folder (or s3://, gs://, az:// prefix) that relative image names are resolved against.
    images: str = ""
    # Synthetic dataset: number of scenes to generate.
    synthetic_images: int = 2400
    # Seed of the synthetic scene generator.
    synthetic_seed: int = 0
    # Scenes generated with another seed for the demo's held-out captioning test.
    synthetic_heldout: int = 300
    # Images with more pixels are refused from their header, before decoding (both jobs).
    max_pixels: int = 64_000_000
    # The seed's sampling: this many captions at random (0 = all), split by image.
    num_examples: int = 30000
    # Fraction of the images (not captions) held out for validation.
    val_fraction: float = 0.2
    # Seed of the caption sampling and the train/val split.
    seed: int = 42


@dataclass
class TextConfig:
    """Tokenizer settings (the seed's: top 5,000 words, `<unk>`, `<pad>` = 0)."""

    # Most frequent training words kept; the rest become <unk>.
    vocab_size: int = 5000
    # 0 = pad to the longest training caption.
    max_length: int = 0


@dataclass
class BackboneConfig:
    """InceptionV3 backbone: `imagenet` (Keras download/cache), `random` (seeded), or an .h5 path/URI."""

    # imagenet | random | path or object-storage URI of a no-top InceptionV3 .h5 weights file.
    weights: str = "imagenet"
    # Seed of the `random` backbone (extraction and captioning must use the same).
    seed: int = 0


@dataclass
class ModelConfig:
    """Show, Attend and Tell decoder sizes and feature normalisation."""

    # Encoder output and word embedding size (E).
    embedding_dim: int = 256
    # GRU and attention size (U).
    units: int = 512
    # none | channel. `channel` standardises each of the 2048 feature channels with statistics of
    # the training features (taken once per features folder and split, stored in the checkpoint);
    # a random backbone's features are ~1e-3 in scale and need it, ImageNet features do not.
    feature_norm: str = "none"
    # float32 | mixed_float16 | mixed_bfloat16 | auto: the Keras dtype policy of training,
    # extraction and captioning (mixed: 16-bit compute, float32 weights; logits, softmax and loss
    # in float32). mixed_float16 for GPUs with tensor cores (V100, T4, A10G, A100, L4...), with
    # dynamic loss scaling in training; mixed_bfloat16 for CPUs with AVX512-BF16 or AMX
    # (InceptionV3 ~1.8x float32 there) and for A100/H100/L4 GPUs; no loss scaling needed.
    # auto is decided where the config is loaded: mixed_float16 when the job uses GPUs, else
    # mixed_bfloat16 when this machine's CPU has BF16 instructions, else float32.
    precision: str = "float32"
    # XLA-compile the InceptionV3 forward pass and the training step's forward/backward pass
    # (a GPU option: on CPU it only costs compile time).
    jit_compile: bool = False


@dataclass
class TrainConfig:
    """Custom-loop training with teacher forcing; batch_size is global (split across workers)."""

    # Passes over the training captions.
    epochs: int = 20
    # Global batch (all workers together); must be divisible by ray.num_workers.
    batch_size: int = 64
    # adam (the seed's) | sgd (plain gradient descent: its step scales with the gradient, unlike
    # Adam's, which makes it the optimizer for checking that workers average gradients exactly).
    optimizer: str = "adam"
    # The optimizer's learning rate (the peak, with lr_schedule=cosine).
    learning_rate: float = 1e-3
    # constant (the seed's Adam) | cosine (decays to 0 over all epochs: steadier final accuracy).
    lr_schedule: str = "constant"
    # lambda of Xu et al.'s doubly stochastic attention regulariser (0 = off, the seed's setting).
    attention_reg: float = 0.0
    # Clip the global gradient norm (after the all-reduce, so all replicas agree); 0 = off.
    clip_norm: float = 0.0
    # Shuffle the training captions every epoch (local shuffle buffer, seeded per epoch).
    shuffle: bool = True
    # Seed of the shuffle and of the model's initial weights.
    shuffle_seed: int = 0
    # MB of memory per training worker for its share of the training captions and the
    # validation set, kept (features in their stored dtype) after the first pass: later epochs
    # then shuffle and batch in memory instead of re-reading, filtering and pairing the feature
    # files through Ray Data (the demo's workers waited for input ~50% of the time without it).
    # A worker whose data does not fit streams every epoch (and says so). 0 = always stream.
    cache_mb: int = 4096
    # The last K epoch checkpoints are kept under runs/<name>/; the best by val_loss is copied
    # to runs/<name>/best/ (pointed to by best.json) and never deleted.
    num_to_keep: int = 2
    # Also validate, report and checkpoint every N steps inside an epoch (0 = at epoch ends only);
    # a resumed run then loses at most N steps. Mid-epoch checkpoints count towards num_to_keep.
    checkpoint_every_steps: int = 0
    # Ray Train restarts after a worker failure, from the last checkpoint.
    max_failures: int = 0


@dataclass
class ExtractConfig:
    """Ray Data feature extraction: an actor pool holding InceptionV3."""

    # Images per forward pass of an InceptionV3 actor.
    batch_size: int = 16
    # Size range of the InceptionV3 actor pool (Ray Data autoscales within it).
    min_actors: int = 1
    max_actors: int = 1
    # GPUs per actor: 1 on GPU clusters, 0 on CPU.
    num_gpus: float = 0.0
    # float16 halves storage and I/O; float32 keeps every bit.
    dtype: str = "float16"
    # Parquet codec of the features files: zstd writes 24-30% fewer bytes than snappy for about
    # the same CPU (~1 ms per image) and reads faster (bench/feature_codec.py); none when CPUs,
    # not storage, are the limit (GPU nodes with few vCPUs).
    compression: str = "zstd"
    # Recompute every feature (deletes the features folder first); also --overwrite. Refused when
    # that folder holds the input, a caption output or others' files.
    overwrite: bool = False
    # Any input kind (see `inputs`) to featurize into `<work_dir>/features`, with its columns
    # (e.g. captions) passed through; "" = the images of the training split (data.*).
    input: str = ""


@dataclass
class InputsConfig:
    """How a job's input becomes shards: the unit of work, of output files and of resume."""

    # auto | files | manifest | webdataset. auto: a .csv/.parquet file, glob or folder of them is a
    # manifest (or Parquet with image bytes, when it has `bytes_column` and no `image`), .tar files
    # are WebDataset shards, anything else a folder/prefix of image files.
    format: str = "auto"
    # Images per shard (one output file each) of a listed folder/prefix or a large CSV manifest
    # (split once); Parquet inputs: whole row groups up to this many rows; a tar is one shard.
    shard_rows: int = 1000
    # Which files of a folder/prefix (or tar members) are images (case-insensitive), and an
    # optional file name glob (values are YAML: quote it, "inputs.glob='*.jpg'").
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp", "gif"])
    glob: str = ""
    # Parquet with image bytes (img2dataset's output_format=parquet): the binary image column and
    # the column that names each row (without it: `<file>/<row number>`).
    bytes_column: str = "jpg"
    key_column: str = "key"
    # Threads per actor reading and decoding images ahead of the model.
    io_threads: int = 4
    # Process at most this many new shards (0 = all): a trial run.
    limit_shards: int = 0
    # A folder/prefix is listed again on every run (true), so that a re-run finds the images
    # added, overwritten or removed since; false reuses the last saved listing (resuming a killed
    # run over a huge prefix without paying for another listing). docs/inputs.md#re-runs.
    relist: bool = True
    # Output rows of images that are no longer in the input: prune (deleted, so the output holds
    # every current image exactly once) | keep (kept; `capray audit` reports them as stale).
    removed: str = "prune"
    # Also redo the rows that failed in earlier runs (e.g. after a storage outage); the rows that
    # succeeded are copied, not computed again.
    retry_failed: bool = False
    # Print the plan (shards, rows, what is done, an estimate from earlier shards' stats) and stop
    # before any work; also --dry-run.
    dry_run: bool = False


@dataclass
class CaptionConfig:
    """Bulk captioning: any input kind (see `inputs`) in, one Parquet file per input shard out."""

    # Folder, s3:// gs:// az:// prefix, manifest(s), WebDataset tars or Parquet with image bytes to caption.
    input: str = ""
    # Images per forward pass of a captioning actor.
    batch_size: int = 16
    # Size range of the captioning actor pool (InceptionV3 + decoder in each actor).
    min_actors: int = 1
    max_actors: int = 1
    # GPUs per actor: 1 on GPU clusters, 0 on CPU.
    num_gpus: float = 0.0
    # 0 = the trained maximum caption length.
    max_length: int = 0
    # greedy | beam (batched beam search of beam_size, ranked by log-prob / length**length_alpha).
    strategy: str = "greedy"
    beam_size: int = 3
    length_alpha: float = 0.7
    # Also write each word's 64 attention weights (`attention` column).
    attention: bool = False
    # Redo every caption in the output folder (deletes the folder first); also --overwrite. Refused
    # when the folder is or holds the input, work_dir or checkpoint, the features, or others' files.
    # Without it, an output folder made from another input or with other settings is refused.
    overwrite: bool = False


@dataclass
class StatusConfig:
    """What the caption and extract jobs record for `capray status` (docs/cli.md#status)."""

    # The driver rewrites `<output>/_status/stats.parquet` (one row per finished shard) after this
    # many shards or seconds, and refreshes `<output>/_status/heartbeat.json` every `every_s`.
    every_shards: int = 100
    every_s: float = 30.0
    # A heartbeat older than this many `every_s` periods means the driver is gone (killed, lost).
    stale_periods: float = 3.0


@dataclass
class OverviewConfig:
    """`capray overview`: a caption output as one self-contained HTML page (docs/cli.md#overview)."""

    # The page's file ("" = <output>/_status/overview.html): a local path or s3:// gs:// az:// URI.
    html: str = ""
    # Captions in each gallery: the least confident of the whole output, and as many at random.
    gallery: int = 24
    # Longest side of the gallery's thumbnails in pixels (JPEG, embedded in the page).
    thumbnail_px: int = 160
    # The caption job writes the page of its output when it finishes (off: a Ray pass over all its rows).
    after_job: bool = False


@dataclass
class AuditConfig:
    """`capray audit`: a job's output folder checked against its input, image by image."""

    # Whose output to audit: caption (caption.input vs. the captions folder) | extract (its input vs. features/).
    job: str = "caption"
    # The caption and extract jobs run the audit of their output when they finish and print its verdict.
    after_job: bool = False


@dataclass
class EvaluateConfig:
    """`capray evaluate`: COCO caption metrics on the validation split and an attention report."""

    # Decoding strategies to score: greedy and/or beam (beam uses caption.beam_size, caption.length_alpha).
    strategies: list[str] = field(default_factory=lambda: ["greedy", "beam"])
    # Validation images shown in the report (caption, references, one attention map per word); 0 = none.
    report_images: int = 8
    # Run this evaluation on the best checkpoint when `capray train` finishes.
    after_train: bool = False
    # Validation images decoded per step.
    batch_size: int = 64


@dataclass
class ExportConfig:
    """`capray export`: the checkpoint as a TensorFlow SavedModel (in `output`)."""

    # Replace an existing SavedModel folder (the CLI's --overwrite); otherwise it is refused, as a
    # folder that is no SavedModel is even with it.
    overwrite: bool = False


@dataclass
class StorageConfig:
    """Object storage access: s3:// (the unprefixed keys), gs:// (`gcs_*`), az:// and abfs://
    (`azure_*`). Empty values fall back to each store's standard environment: AWS variables or
    instance profile; Google application default credentials; AZURE_STORAGE_* variables.
    Credentials are never written into saved configs."""

    # S3-compatible endpoint (MinIO, moto...); empty for AWS.
    endpoint_url: str = ""
    # Bucket region (e.g. us-east-1); empty = the endpoint's or environment's default.
    region: str = ""
    # Explicit credentials; on a cluster leave them empty and use an instance profile.
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    # Google Cloud Storage endpoint (an emulator's http://host:port); empty for Google's (or STORAGE_EMULATOR_HOST).
    gcs_endpoint_url: str = ""
    # Google Cloud project of the buckets; empty = the credentials' or GCSFS_DEFAULT_PROJECT.
    gcs_project: str = ""
    # gcsfs token: a service-account JSON file, `anon` (public buckets, emulators), `google_default`; empty = gcsfs's search.
    gcs_token: str = ""
    # Azure Blob endpoint (Azurite's http://host:10000/devstoreaccount1); empty = https://<account>.blob.core.windows.net.
    azure_endpoint_url: str = ""
    # Azure storage account; empty = AZURE_STORAGE_ACCOUNT_NAME.
    azure_account_name: str = ""
    # Account key; empty = AZURE_STORAGE_ACCOUNT_KEY, else a SAS token or Azure AD credentials from the environment.
    azure_account_key: str = ""
    # A full connection string (wins over the three keys above); empty = AZURE_STORAGE_CONNECTION_STRING.
    azure_connection_string: str = ""
    # Transient errors (throttling, 5xx, dropped connections) are tried again this many times,
    # waiting retry_wait_s, then twice that... (up to 30 s, with jitter); an image becomes an
    # error row, or an upload stops the job, only after the last try.
    retries: int = 5
    retry_wait_s: float = 0.5


@dataclass
class RayConfig:
    """Where jobs run and how training scales."""

    # "" = RAY_ADDRESS if set, else a local Ray instance.
    address: str = ""
    # Ray Train workers (one MultiWorkerMirroredStrategy replica each).
    num_workers: int = 2
    # One GPU per training worker.
    use_gpu: bool = False
    # CPUs reserved per training worker.
    cpus_per_worker: float = 1.0
    # CPUs a local Ray instance advertises (0 = the machine's count); ignored on a cluster.
    local_cpus: int = 0
    # A local Ray instance serves its dashboard (http://127.0.0.1:8265: jobs, actors, logs) when
    # Ray's dashboard packages are installed; false saves its processes' CPU. Ignored on a cluster.
    local_dashboard: bool = True
    # Extraction and captioning: batches each actor reads and decodes ahead of its model. Enough to
    # keep the model busy; few enough that an actor's memory stays a few batches of pixels.
    inflight_batches: int = 2


@dataclass
class Config:
    """The whole capray configuration."""

    # Run name: checkpoints go to <work_dir>/runs/<name>/.
    name: str = "capray"
    # Root of every output: features/, runs/, captions/, split.parquet (local path or s3://, gs://, az:// URI).
    work_dir: str = "outputs/capray"
    # Where the caption job writes ("" = <work_dir>/captions); `capray export` needs it set.
    output: str = ""
    # Checkpoint to caption/evaluate with; "" = the best checkpoint of run `name`.
    checkpoint: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    overview: OverviewConfig = field(default_factory=OverviewConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


SECRET_KEYS = (
    "access_key_id",
    "secret_access_key",
    "session_token",
    "gcs_token",
    "azure_account_key",
    "azure_connection_string",
)
CHOICES = {
    "data.format": ("synthetic", "coco", "flickr", "table"),
    "model.feature_norm": ("none", "channel"),
    "model.precision": ("float32", "mixed_float16", "mixed_bfloat16", "auto"),
    "extract.dtype": ("float16", "float32"),
    "extract.compression": ("zstd", "snappy", "lz4", "none"),
    "caption.strategy": ("greedy", "beam"),
    "audit.job": ("caption", "extract"),
    "inputs.format": ("auto", "files", "manifest", "webdataset"),
    "inputs.removed": ("prune", "keep"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.optimizer": ("adam", "sgd"),
}
POSITIVE = (
    "text.vocab_size",
    "model.embedding_dim",
    "model.units",
    "train.epochs",
    "train.batch_size",
    "extract.batch_size",
    "extract.min_actors",
    "extract.max_actors",
    "caption.batch_size",
    "caption.min_actors",
    "caption.max_actors",
    "inputs.shard_rows",
    "inputs.io_threads",
    "caption.beam_size",
    "ray.num_workers",
    "ray.inflight_batches",
    "data.max_pixels",
    "data.synthetic_images",
    "data.synthetic_heldout",
    "evaluate.batch_size",
    "overview.gallery",
    "overview.thumbnail_px",
    # 0 would rewrite the roll-up after every shard, refresh the heartbeat in a busy loop, or call
    # every job lost.
    "status.every_shards",
    "status.every_s",
    "status.stale_periods",
)
NON_NEGATIVE = (
    "data.num_examples",
    "text.max_length",
    "train.num_to_keep",
    "train.max_failures",
    "train.checkpoint_every_steps",
    "train.attention_reg",
    "train.clip_norm",
    "train.cache_mb",
    "extract.num_gpus",
    "caption.num_gpus",
    "caption.max_length",
    "inputs.limit_shards",
    "caption.length_alpha",
    "ray.cpus_per_worker",
    "ray.local_cpus",
    "evaluate.report_images",
    # Negative: no try at all (storage.retries), or a negative sleep (storage.retry_wait_s).
    "storage.retries",
    "storage.retry_wait_s",
)


# Keys and sections that moved, old -> (new, how a saved value carries over). A user's config
# that still names an old key is refused with the new name (never "unknown key"). A config saved
# by an earlier capray (a checkpoint's, an output folder's) is read with the old value moved to
# the new key when it means the same there (`same`), translated (a function), or dropped when it
# only described how that run was used (`drop`): a saved `encoder.weights: random` stays a random
# backbone, never the default imagenet one.
RENAMED: dict[str, tuple[str, Any]] = {
    # Sections: every key under them moved.
    "encoder": ("backbone", "same"),  # InceptionV3; "encoder" is the model's Dense(256) layer
    "infer": ("caption", "same"),  # named after the command, `capray caption`
    # Keys (as they were named then; a key of a renamed section is looked up under its new name).
    "infer.glob": ("inputs.glob", "same"),
    "infer.extensions": ("inputs.extensions", "same"),
    "infer.limit": ("inputs.limit_shards (shards, not images)", "drop"),
    "infer.rows_per_file": ("inputs.shard_rows (one output file per input shard)", "drop"),
    "model.mixed_precision": (
        "model.precision (float32 | mixed_float16 | mixed_bfloat16 | auto)",
        lambda on: "mixed_float16" if on else "float32",
    ),
}
# Values that were renamed: (key, old value) -> new value; refused and carried over as above.
RENAMED_VALUES: dict[tuple[str, str], str] = {
    ("data.format", "manifest"): "table",  # a captions table; "manifest" is an input kind (inputs.md)
}
