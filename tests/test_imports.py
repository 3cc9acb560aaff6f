"""The driver side stays light: the modules a job's driver and its Ray Data tasks import do not load
TensorFlow (only the model actors and training workers do)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Ray Data runs functions of these modules in fresh worker processes: importing TensorFlow there
# costs seconds of CPU per process, for nothing.
TF_FREE = ["capray.config", "capray.storage", "capray.text", "capray.images", "capray.inputs", "capray.pipeline", "capray.data",
           "capray.features", "capray.infer", "capray.runtime", "capray.checkpoint"]


@pytest.mark.parametrize("module", TF_FREE)
def test_module_does_not_import_tensorflow(module: str) -> None:
    script = f"import sys, {module}; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"
