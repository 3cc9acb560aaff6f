"""TensorFlow imported without its start-up banners, in the driver and in every Ray worker.

On a CPU machine TensorFlow 2.21 writes, from C++ and before its log settings apply (neither
TF_CPP_MIN_LOG_LEVEL nor the absl/glog variables silence them):

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)   (first device probe)

Users read them as errors. So `import tensorflow` runs with file descriptor 2 sent to a temporary
file, together with the first device probe; afterwards every captured line that is not one of
these known banners is written to stderr again, so real warnings and errors still show.

`install()` makes every `import tensorflow` of the process do this, whichever module asks first
(capray.model, Keras, `ray.train.tensorflow` in a Ray Train worker): capray/__init__ installs it in
the driver, and Ray runs it at the start of every worker (capray.runtime, worker_process_setup_hook).
Nothing here imports TensorFlow itself.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

# absl's line prefix: severity, date, time, thread id, file:line]
_ABSL = r"[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] "
NOISE = [
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
        _ABSL + r"Could not find cuda drivers on your machine, GPU will not be used\.$",
        _ABSL + r"oneDNN custom operations are on\.",
        _ABSL + r"failed call to cuInit: ",
        _ABSL + r"This TensorFlow binary is optimized to use available CPU instructions",
        # GPU builds: each CUDA library registers itself twice when TensorFlow and XLA both load it.
        _ABSL + r"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin",
    )
]


def is_noise(line: str) -> bool:
    """True for a line of TensorFlow's known start-up banners."""
    line = line.rstrip("\r\n")
    return any(p.search(line) for p in NOISE)


def without_noise(text: str) -> str:
    """`text` less the start-up banner lines, every other line kept as it was."""
    return "".join(line for line in text.splitlines(keepends=True) if not is_noise(line))


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python writes alike); replay it less the banners."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr to filter (closed, or not a file)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = without_noise(captured.read().decode("utf-8", errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run inside `filtered_stderr` and followed by the device probe."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with filtered_stderr():
            self.loader.exec_module(module)
            # The CUDA probe (cuInit) prints at the first device query: do it here, while filtered.
            # Listing devices does not initialise them: memory growth can still be set later.
            module.config.list_physical_devices()

    def __getattr__(self, name: str) -> Any:  # get_data, is_package, ... for importlib.resources
        return getattr(self.loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and wraps its loader; other names pass through."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Make this process's first `import tensorflow` quiet (idempotent; TF is not imported)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def import_tensorflow() -> ModuleType:
    """`import tensorflow`, without the start-up banners: the way capray imports TensorFlow."""
    install()
    import tensorflow

    return tensorflow
