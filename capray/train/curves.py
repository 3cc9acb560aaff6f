"""Training curves: TensorBoard event files under `<runs>/<name>/tensorboard/`, and `loss.png`.

The rank-0 worker writes one value per tag per report (`train_loss`, `val_loss`,
`learning_rate`, `captions_per_s`) at the report's global step: `tensorboard --logdir
<work_dir>/runs/<name>/tensorboard` (local or object storage: written locally, each flush uploaded) shows them.
TensorFlow writes event files to local disk only, so on S3 they are written to a local folder
and uploaded after every report (small files: a few hundred bytes per report). A resumed run
appends a new event file; `read` keeps the latest value of a step reported twice.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

from capray import storage
from capray.model import tf  # TensorFlow, quietly

TAGS = ("train_loss", "val_loss", "learning_rate", "captions_per_s")


class CurveWriter:
    """Rank 0's TensorBoard writer for one run; `close` it at the end (on object storage it
    removes the local copy, every file of which was uploaded at its last flush)."""

    def __init__(self, uri: str, storage_cfg: Any = None):
        self.uri, self.storage_cfg = uri, storage_cfg
        self.remote = storage.is_remote(uri)
        self.local = tempfile.mkdtemp(prefix="capray-tb-") if self.remote else uri
        os.makedirs(self.local, exist_ok=True)
        self.writer = tf.summary.create_file_writer(self.local)

    def add(self, step: int, values: dict[str, float]) -> None:
        """One value per tag at `step`, then flushed (and uploaded, on S3)."""
        with self.writer.as_default(step=step):
            for tag in TAGS:
                if tag in values:
                    tf.summary.scalar(tag, float(values[tag]))
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                storage.upload_file(os.path.join(self.local, name), storage.join(self.uri, name), self.storage_cfg)

    def close(self) -> None:
        """Close the event file; on object storage, remove the local folder."""
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def read(uri: str, storage_cfg: Any = None) -> dict[str, list[tuple[int, float]]]:
    """Every tag's (step, value) points from the event files under `uri`, sorted by step."""
    from tensorflow.core.util import event_pb2

    if not storage.exists(uri, storage_cfg):
        return {}
    points: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(storage.list_files(uri, storage_cfg, ())):
            if ".tfevents." not in f.rsplit("/", 1)[-1]:
                continue
            local = os.path.join(tmp, f"{i}.tfevents")
            with open(local, "wb") as out:
                out.write(storage.read_bytes(f, storage_cfg))
            # tf.data rather than tf.compat.v1.train.summary_iterator: that one prints a
            # deprecation warning on the job's console.
            for record in tf.data.TFRecordDataset(local):
                event = event_pb2.Event.FromString(record.numpy())
                for v in event.summary.value:
                    value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    seen = points.setdefault(v.tag, {})
                    # The same step reported again (a resumed run): the later report wins.
                    if event.step not in seen or seen[event.step][0] <= event.wall_time:
                        seen[event.step] = (event.wall_time, value)
    return {tag: sorted((s, v) for s, (_, v) in steps.items()) for tag, steps in points.items()}


def loss_png(curves: dict[str, list[tuple[int, float]]], title: str = "") -> bytes:
    """Training and validation loss per step as a PNG (matplotlib, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=96)
    ax = fig.add_subplot(1, 1, 1)
    for tag, label in (
        ("train_loss", "training loss (mean of the steps since the last report)"),
        ("val_loss", "validation loss"),
    ):
        if curves.get(tag):
            steps, values = zip(*curves[tag])
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per token")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
