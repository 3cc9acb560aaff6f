"""Multi-node: a head and two worker nodes on this machine; jobs spread over them; a node killed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from capray import synthetic

# A three-node cluster started, used by two jobs and a node killed: the longest test.
pytestmark = pytest.mark.timeout(1800)
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
N_IMAGES = 24


def test_jobs_spread_over_nodes_and_a_killed_node_loses_no_image(tiny_checkpoint: str, tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "in", N_IMAGES, seed=11, prefix="m")
    images = tmp_path / "in" / "images"
    # A private Ray temp dir (short: socket paths live under it). Cluster() writes its address to
    # <temp dir>/ray/ray_current_cluster, where any other `ray.init()` on this machine would
    # otherwise find it and connect to this test's cluster.
    ray_tmp = tempfile.mkdtemp(prefix="crmn")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, str(HERE / "multinode_driver.py"), str(images), tiny_checkpoint, str(tmp_path / "work")],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    report = json.loads(lines[-1][len("RESULT ") :])
    print("multinode report:", json.dumps(report))  # shown with `pytest -rP`

    # Extraction: two map actors on two different nodes, every image extracted.
    assert "error" not in report["extract"], report["extract"]
    assert len(report["extract"]["nodes_with_actors"]) >= 2, report["extract"]
    assert report["extract"]["result"]["extracted"] == N_IMAGES

    # Captioning: spread too; a worker node was killed once output had started to appear.
    cap = report["caption"]
    assert report["killed"].get("node", "").startswith("worker"), report
    assert "error" not in cap, cap
    assert len(cap["nodes_with_actors"]) >= 2, cap
    rows = pd.read_parquet(tmp_path / "work" / "captions")
    expected = sorted(str(p) for p in images.glob("*.jpg"))
    assert sorted(rows["image"]) == expected  # every input image exactly once
    assert rows["error"].isna().all()
