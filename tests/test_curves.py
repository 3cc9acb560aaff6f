"""Training curves (capray.train.curves) on object storage: each report is in the bucket as soon
as it is flushed, a resumed run's second writer adds to them, and a closed writer leaves no local
copy behind (a training run on S3 used to leave one temporary folder per run)."""

from __future__ import annotations

import os

from capray import storage
from capray.train.curves import CurveWriter, read


def test_curves_on_s3_are_uploaded_at_each_report_and_leave_no_local_copy(s3) -> None:
    cfg = s3.config()
    uri = f"{s3.bucket('curves')}/runs/demo/tensorboard"

    first = CurveWriter(uri, cfg.storage)
    local = first.local
    assert os.path.isdir(local) and local != uri
    first.add(1, {"train_loss": 2.0, "val_loss": 2.5, "learning_rate": 0.5})
    # In the bucket after the report, while the run goes on.
    assert read(uri, cfg.storage)["train_loss"] == [(1, 2.0)]
    first.add(2, {"train_loss": 1.5, "val_loss": 2.0})
    first.close()
    assert not os.path.exists(local)

    # A resumed run: a new event file beside the first; step 2 reported again, the later value wins
    # (values exact in float32, as TensorBoard stores them).
    resumed = CurveWriter(uri, cfg.storage)
    resumed.add(2, {"train_loss": 1.25})
    resumed.add(3, {"train_loss": 1.0, "val_loss": 1.75})
    resumed.close()
    assert not os.path.exists(resumed.local)

    curves = read(uri, cfg.storage)
    assert curves["train_loss"] == [(1, 2.0), (2, 1.25), (3, 1.0)]
    assert curves["val_loss"] == [(1, 2.5), (2, 2.0), (3, 1.75)]
    assert [v for _, v in curves["learning_rate"]] == [0.5]
    assert sum(".tfevents." in f for f in storage.list_files(uri, cfg.storage, ())) == 2


def test_curves_on_local_disk_are_written_in_place(tmp_path) -> None:
    uri = str(tmp_path / "tensorboard")
    writer = CurveWriter(uri)
    writer.add(1, {"train_loss": 2.0})
    writer.close()
    assert writer.local == uri and os.path.isdir(uri)  # the run's own folder, kept
    assert read(uri)["train_loss"] == [(1, 2.0)]
