"""A running image job's record of itself: per-shard stats, their roll-up, and the driver's heartbeat.

    <output>/<shard id>.parquet     each file's footer (key `capray_stats`): that shard's stats,
                                    so they appear exactly when the file does (one upload)
    <output>/_shards.parquet        the plan: every shard of the input, written before any work (capray.shards)
    <output>/_status/stats.parquet  the driver's roll-up: one row per shard it has seen finish,
                                    rewritten every `status.every_shards` shards or `status.every_s` s
    <output>/_status/heartbeat.json the driver: run, host, pid, state (running | finished | stopped),
                                    refreshed every `status.every_s` s by a thread

`capray status` (capray.status) reads these three objects, lists the folder, and reads the footers
of only the files the roll-up does not hold yet (those finished since its last flush, or by a
driver that was killed before it flushed). The driver holds one stats row per shard: O(shards).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage
from capray.images import ERROR_CLASSES

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)

STATS_KEY = "capray_stats"  # the output file's footer key-value metadata
STATUS_DIR = "_status"
ROLLUP = "stats.parquet"
HEARTBEAT = "heartbeat.json"
CLASSES = [name for name, _ in ERROR_CLASSES] + ["other"]
# The per-shard stats, in the footer and in the roll-up (docs/outputs.md#per-shard-stats).
FIELDS = pa.schema(
    [
        ("shard", pa.string()),
        ("run", pa.string()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("failed", pa.int64()),
        ("errors", pa.string()),  # JSON: {class: count}
        ("duplicates", pa.int64()),
        ("copied", pa.int64()),
        ("bytes_read", pa.int64()),
        ("read_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("wait_s", pa.float64()),
        ("model_s", pa.float64()),
        ("write_s", pa.float64()),
        ("upload_s", pa.float64()),
        ("started", pa.float64()),
        ("ended", pa.float64()),
        ("node", pa.string()),
        ("capray_version", pa.string()),
        ("checkpoint", pa.string()),
        ("config_digest", pa.string()),
    ]
)


def status_uri(output: str, name: str) -> str:
    return storage.join(output, STATUS_DIR, name)


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of what a job's output depends on (its recorded settings)."""
    from capray.listing import digest

    return digest(json.dumps(settings, sort_keys=True, default=str))


def node() -> str:
    return socket.gethostname()


def footer_stats(uri: str, storage_cfg: Any) -> dict[str, Any] | None:
    """A shard file's stats from its Parquet footer (no rows read); None for a file without them."""
    fs, path = storage.filesystem(uri, storage_cfg)

    def read() -> dict[bytes, bytes]:
        with fs.open_input_file(path) as f:
            return dict(pq.ParquetFile(f).metadata.metadata or {})

    meta = storage.retrying(read, f"reading the footer of {uri}", storage_cfg) if storage.is_remote(uri) else read()
    raw = meta.get(STATS_KEY.encode())
    return json.loads(raw) if raw else None


def read_rollup(output: str, storage_cfg: Any) -> list[dict[str, Any]]:
    """The roll-up's rows ([] when there is none yet)."""
    uri = status_uri(output, ROLLUP)
    try:
        data = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        return []
    rows = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False).to_pylist()
    for r in rows:
        r["errors"] = json.loads(r["errors"] or "{}")
    return rows


def read_heartbeat(output: str, storage_cfg: Any) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(status_uri(output, HEARTBEAT), storage_cfg))
    except FileNotFoundError:
        return None


class Rollup:
    """The driver's side: stats rows in, `_status/stats.parquet` and the heartbeat out.

    Rows of earlier runs are kept for the shards of the current plan that are done; the rest
    (files superseded by a change of the input) are dropped. A storage error while writing the
    roll-up or heartbeat is logged, never raised: they inform, the output files are the truth.
    """

    def __init__(self, cfg: Config, output: str, label: str, plan_ids: list[str], done_ids: set[str]):
        self.output, self.storage_cfg, self.label = output, cfg.storage, label
        self.every_shards, self.every_s = cfg.status.every_shards, cfg.status.every_s
        self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.lock = threading.Lock()
        try:
            old = read_rollup(output, self.storage_cfg)
        except Exception as e:  # noqa: BLE001 (a damaged roll-up is rebuilt from this run's shards)
            log.warning("%s: cannot read %s (%s): it is rebuilt from this run's shards", label, ROLLUP, e)
            old = []
        self.rows = {r["shard"]: r for r in old if r["shard"] in done_ids}
        self.pending = 0
        self.flushed_at = time.monotonic()
        self.heartbeat = {
            "format": "capray-heartbeat/1",
            "job": label,
            "run": self.run,
            "host": node(),
            "pid": os.getpid(),
            "started_at": self.started,
            "every_s": self.every_s,
            "shards": len(plan_ids),
        }
        self.stop = threading.Event()
        self._beat("running")
        self.flush()
        self.thread = threading.Thread(target=self._loop, name="capray-heartbeat", daemon=True)
        self.thread.start()

    def add(self, stats: dict[str, Any]) -> None:
        with self.lock:
            self.rows[stats["shard"]] = stats
            self.pending += 1
        if self.pending >= self.every_shards:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            rows = [{**r, "errors": json.dumps(r.get("errors") or {})} for r in self.rows.values()]
            self.pending = 0
            self.flushed_at = time.monotonic()
        try:
            table = pa.Table.from_pylist(rows, schema=FIELDS)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            storage.write_bytes(status_uri(self.output, ROLLUP), sink.getvalue().to_pybytes(), self.storage_cfg)
        except Exception as e:  # noqa: BLE001 (see the class docstring)
            log.warning("%s: could not write %s: %s", self.label, ROLLUP, e)

    def _beat(self, state: str) -> None:
        body = {**self.heartbeat, "state": state, "updated_at": time.time()}
        try:
            storage.write_bytes(status_uri(self.output, HEARTBEAT), json.dumps(body).encode(), self.storage_cfg)
        except Exception as e:  # noqa: BLE001 (see the class docstring)
            log.warning("%s: could not write %s: %s", self.label, HEARTBEAT, e)

    def _loop(self) -> None:
        # The driver's loop blocks while no shard finishes: a thread keeps the heartbeat fresh,
        # and flushes what finished since the last flush once it is `every_s` old.
        while not self.stop.wait(self.every_s):
            if self.pending and time.monotonic() - self.flushed_at >= self.every_s:
                self.flush()
            self._beat("running")

    def close(self, state: str) -> None:
        """The last flush and heartbeat: `finished` or `stopped`."""
        self.stop.set()
        self.thread.join()
        self.flush()
        self._beat(state)
