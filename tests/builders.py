"""Test data built once and shared: a tiny checkpoint, and work dirs that reuse extracted features."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from capray.config import load_config
from capray.text import Tokenizer

REPO = Path(__file__).resolve().parents[1]
# The scenes every shared-feature test trains on (configs/demo.yaml: random backbone, channel norm).
SYNTHETIC_IMAGES = 96
# What identifies each of TensorFlow's start-up banners in a log, whatever its timestamp and
# thread (capray.tfquiet drops them; tests/test_cli.py has whole examples).
BANNER_MARKS = [
    "absl::InitializeLog()",
    "Could not find cuda drivers",
    "oneDNN custom operations are on",
    "failed call to cuInit",
]
# Ray Train's per-report INFO lines from the training workers (one per epoch and checkpoint);
# Ray Data's progress bars without tqdm and Ray Train's use of a deprecated option of Ray Data
# (once per run); TensorFlow's deprecated event-file reader (the loss curves).
TRAIN_NOISE = [
    "Checkpoint successfully created",
    "Reporting training result",
    "tqdm is not installed",
    "Progress bars disabled",
    "A new progress UI is available",
    "ExecutionOptions.exclude_resources",
    "tf_record_iterator",
]


def write_tiny_checkpoint(directory: Path, units: int = 16) -> str:
    """An untrained but complete checkpoint (random InceptionV3, small decoder): the caption job's
    plumbing and fault handling do not depend on what the model learned, and training costs minutes."""
    import keras

    from capray import checkpoint
    from capray.model import ShowAttendTell, make_optimizer

    # Seeded: an untrained decoder's first word is a coin toss between `<end>` (an empty caption)
    # and a word; the tests that check captions are not empty need the same weights every session.
    keras.utils.set_random_seed(1)
    tokenizer = Tokenizer.fit(["a red circle", "two blue squares left of a green triangle"], max_length=6)
    cfg = load_config(None, ["backbone.weights=random", "model.embedding_dim=8", f"model.units={units}"])
    model = ShowAttendTell(tokenizer.vocab_size, 8, units).build_all()
    optimizer = make_optimizer(1e-3)
    optimizer.build(model.trainable_variables)
    checkpoint.write(str(directory), model, optimizer, tokenizer, cfg, {"epoch": 1, "step": 1})
    return str(directory)


def extract_synthetic(work: Path) -> Path:
    """Generate SYNTHETIC_IMAGES scenes under `work` and extract their features (needs Ray)."""
    from capray import extraction

    extraction.run(
        load_config(REPO / "configs/demo.yaml", [f"work_dir={work}", f"data.synthetic_images={SYNTHETIC_IMAGES}"])
    )
    return work


def reuse_features(shared: Path, work: Path) -> list[str]:
    """Overrides for a new work dir `work` whose features are the shared, already extracted ones.

    The features folder is a symbolic link (training only reads it) and the captions are the
    shared manifest, so the image names agree; split, tokenizer and runs are `work`'s own.
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "features").symlink_to(shared / "features", target_is_directory=True)
    return feature_overrides(shared, work)


def feature_overrides(shared: Path, work: Path | str) -> list[str]:
    """The overrides of a work dir made by `reuse_features(shared, work)`, or of one (local or a
    store's URI) that `upload_features` filled."""
    return [
        f"work_dir={work}",
        f"data.annotations={shared / 'data' / 'captions.csv'}",
        f"data.synthetic_images={SYNTHETIC_IMAGES}",
    ]


def upload_features(shared: Path, uri: str, storage_cfg) -> None:
    """Copy the shared features folder to `uri` (e.g. an s3:// work dir's `features`), file by file."""
    from capray import storage

    root = shared / "features"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):  # also the job's _status/
        storage.write_bytes(f"{uri}/{path.relative_to(root).as_posix()}", path.read_bytes(), storage_cfg)


def checkpoint_states(run_dir: str) -> list[dict]:
    """Every kept checkpoint's state.json under a Ray Train run folder, in step order."""
    states = [json.loads(Path(p).read_text()) for p in glob.glob(f"{run_dir}/checkpoint_*/state.json")]
    return sorted(states, key=lambda s: s["step"])


def standin_output(
    output: str,
    storage_cfg,
    shards: int,
    done: int,
    rolled_up: int,
    state: str = "running",
    heartbeat_at: float = 0.0,
    rows: int = 100,
    threads: int = 32,
    put=None,
) -> float:
    """An output folder as a caption job leaves it, without Ray or a model: the plan of `shards`
    shards of `rows` rows, the first `done` written (tiny Parquet files whose footers hold their
    stats: 1 of `rows` rows failed as `truncated`, one shard ending per second), the driver's
    roll-up holding the first `rolled_up` of them, and its heartbeat (`state`, written at
    `heartbeat_at`, default: now). `put(uri, bytes)` writes the shard files (default:
    capray.storage; bench/status.py puts 10^5 of them with one request each). Returns the time
    the last shard ended."""
    import io
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    from capray import progress, storage
    from capray import shards as shard_index

    now = time.time()
    ids = [f"list-{i:06d}.{i:012x}" for i in range(shards)]
    entries = [
        {"id": i, "kind": "listing", "source": "", "lo": "", "hi": "", "rows": rows, "failed": -1, "state": "current"}
        for i in ids
    ]
    shard_index.write_index(
        output, storage_cfg, entries, {"format": shard_index.FORMAT, "input": "s3://in/photos", "settings": {}}
    )
    end0 = now - done

    def stats(k: int) -> dict:
        return {
            "shard": ids[k], "run": "standin", "rows": rows, "ok": rows - 1, "failed": 1, "errors": {"truncated": 1},
            "duplicates": 0, "copied": 0, "bytes_read": 1000 * rows, "read_s": 0.1, "decode_s": 0.2, "wait_s": 0.0,
            "model_s": 1.0, "write_s": 0.01, "upload_s": 0.01, "started": end0 + k - 2, "ended": end0 + k,
            "node": "standin", "capray_version": "0", "checkpoint": "ckpt", "config_digest": "0",
        }  # fmt: skip

    table = pa.table({"image": pa.array([], pa.string())})

    def write(k: int) -> None:
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, table.schema) as w:
            w.add_key_value_metadata({progress.STATS_KEY: json.dumps(stats(k))})
        uri = storage.join(output, shard_index.output_name(ids[k]))
        put(uri, buf.getvalue()) if put else storage.write_bytes(uri, buf.getvalue(), storage_cfg)

    list(ThreadPoolExecutor(threads).map(write, range(done)))
    rolled = [{**stats(k), "errors": json.dumps(stats(k)["errors"])} for k in range(rolled_up)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rolled, schema=progress.FIELDS), sink)
    storage.write_bytes(progress.status_uri(output, progress.ROLLUP), sink.getvalue().to_pybytes(), storage_cfg)
    beat = {
        "format": "capray-heartbeat/1", "job": "caption", "run": "standin", "host": "standin", "pid": 1,
        "started_at": end0 - 1, "every_s": 30.0, "shards": shards, "state": state, "updated_at": heartbeat_at or now,
    }  # fmt: skip
    storage.write_bytes(progress.status_uri(output, progress.HEARTBEAT), json.dumps(beat).encode(), storage_cfg)
    return end0 + done - 1


def caption_output(cfg, input_uri: str, output: str, captions=None) -> dict:
    """A caption job's output folder for `input_uri`, without a model: the real planner
    (capray.inputs), reader and image loader (capray.worker.load_image) make its rows, keys,
    shards, errors and footers as the job would; captions are `captions(key, k)` -> (text,
    log_prob, num_tokens) (default: one per image, less confident the later it comes). Writes the
    index (`_shards.parquet`), the saved config, one file per shard with its stats in the footer,
    and a finished heartbeat. Returns {key: caption text or error}."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from capray import inputs, progress, storage
    from capray import shards as shard_index
    from capray.captioning import SCHEMA
    from capray.config import output_paths, save_next_to
    from capray.images import error_class
    from capray.inputs import DATA, KEY, URI
    from capray.reader import read_shard
    from capray.worker import load_image

    captions = captions or (lambda key, k: (f"caption {k} of {key.rsplit('/', 1)[-1]}", -0.05 * (k + 1) * 5, 5))
    plan = inputs.plan(cfg, input_uri, output_paths(cfg)["inputs"])
    started = time.time() - 10 * len(plan.shards)
    entries, result, k = [], {}, 0
    for n, shard in enumerate(plan.shards):
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        for table in read_shard(shard, cfg, 1000):
            for row in table.to_pylist():
                item = row.get(DATA) if DATA in row else row.get(URI)
                error = row.get("_error") or load_image(item, cfg.storage, cfg.data.max_pixels)[1]
                text, log_prob, tokens = (None, None, None) if error else captions(row[KEY], k)
                k += 0 if error else 1
                for name, value in zip(
                    SCHEMA.names, (row[KEY], text, log_prob, tokens, "greedy", "ckpt", error or None)
                ):
                    rows[name].append(value)
                result[row[KEY]] = error or text
        failed = [e for e in rows["error"] if e]
        errors: dict[str, int] = {}
        for e in failed:
            errors[error_class(e)] = errors.get(error_class(e), 0) + 1
        stats = {
            "shard": shard.id, "run": "standin", "rows": len(rows["image"]), "ok": len(rows["image"]) - len(failed),
            "failed": len(failed), "errors": errors, "duplicates": 0, "copied": 0, "bytes_read": 0, "read_s": 0.0,
            "decode_s": 0.0, "wait_s": 0.0, "model_s": 0.0, "write_s": 0.0, "upload_s": 0.0,
            "started": started + 10 * n, "ended": started + 10 * n + 9, "node": "standin", "capray_version": "0",
            "checkpoint": "ckpt", "config_digest": "0",
        }  # fmt: skip
        table = pa.table(rows, schema=SCHEMA).replace_schema_metadata({progress.STATS_KEY: json.dumps(stats)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(
            storage.join(output, shard_index.output_name(shard.id)), sink.getvalue().to_pybytes(), cfg.storage
        )
        entries.append(
            {"id": shard.id, "kind": shard.kind, "source": shard.source, "lo": shard.lo, "hi": shard.hi,
             "rows": len(rows["image"]), "failed": len(failed), "state": "current"}
        )  # fmt: skip
    meta = {"format": shard_index.FORMAT, "input": input_uri, "settings": {"checkpoint": "ckpt"}}
    shard_index.write_index(output, cfg.storage, entries, meta)
    save_next_to(cfg, output)
    beat = {
        "format": "capray-heartbeat/1", "job": "caption", "run": "standin", "host": "standin", "pid": 1,
        "started_at": started, "every_s": 30.0, "shards": len(entries), "state": "finished", "updated_at": time.time(),
    }  # fmt: skip
    storage.write_bytes(progress.status_uri(output, progress.HEARTBEAT), json.dumps(beat).encode(), cfg.storage)
    return result
