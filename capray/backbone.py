"""Where the InceptionV3 backbone's weights come from (`backbone.weights`), without TensorFlow.

The driver calls `check` before any Ray work, so a missing file or an offline machine is one
clear line instead of a failure inside every actor; the actors call it again and find the file
it left in the Keras cache (a worker node of a cluster fetches it once into its own cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# The no-top weights file keras.applications.InceptionV3(weights="imagenet") downloads: same
# name, origin and hash, so a file Keras cached before is used, and one fetched here serves Keras.
WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + WEIGHTS_FILE
WEIGHTS_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"
# Seconds without progress (connect or read) before the download is given up.
DOWNLOAD_TIMEOUT_S = 60


class BackboneError(RuntimeError):
    """The InceptionV3 weights could not be loaded."""


def keras_cache_dir() -> str:
    """The folder Keras caches application weights in (`$KERAS_HOME/models`, else ~/.keras/models)."""
    # As keras.src.backend.config and keras.utils.get_file decide it, /tmp fallbacks included.
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    with contextlib.suppress(OSError):
        os.makedirs(home, exist_ok=True)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return os.path.join(home, "models")


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _failed(reason: str) -> BackboneError:
    return BackboneError(
        f"could not load the ImageNet InceptionV3 weights ({reason}). "
        f"Either give a local or object-storage (s3://, gs://, az://) copy of the no-top weights file with backbone.weights=/path/{WEIGHTS_FILE}, "
        "or use backbone.weights=random for a seeded random backbone."
    )


def imagenet_weights(timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """The cached ImageNet weights file, downloaded into the Keras cache first if it is not there."""
    cache = keras_cache_dir()
    path = os.path.join(cache, WEIGHTS_FILE)
    if os.path.exists(path) and _md5(path) == WEIGHTS_MD5:
        return path
    log.info("downloading the ImageNet InceptionV3 weights (87 MB) into %s", cache)
    tmp = None
    try:
        os.makedirs(cache, exist_ok=True)
        # A temporary name, renamed when complete and verified: actors on the same node that
        # fetch at the same time never load a half-written file.
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{WEIGHTS_FILE}.")
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(WEIGHTS_URL, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != WEIGHTS_MD5:
            raise ValueError(f"the downloaded file's md5 is {digest.hexdigest()}, expected {WEIGHTS_MD5}")
        os.replace(tmp, path)
        tmp = None
    except Exception as e:  # noqa: BLE001 (offline, proxy refused, timeout, disk full, corrupt download...)
        reason = " ".join(str(e).split())  # one line: the CLI prints the message as it is
        raise _failed(
            f"not in the Keras cache {cache} and the download from {WEIGHTS_URL} failed: {type(e).__name__}: {reason}"
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return path


def check(weights: str, storage_cfg: Any = None) -> str | None:
    """Where `backbone.weights` loads from (a local path or object-storage URI; None for `random`), fetching
    the ImageNet file into the cache if needed; raises BackboneError when it cannot be had."""
    if weights == "random":
        return None
    if weights == "imagenet":
        return imagenet_weights()
    if not weights.endswith(".h5"):
        raise BackboneError(f"backbone.weights={weights!r}: expected 'imagenet', 'random' or a path/URI ending in .h5")
    from capray import storage  # pyarrow only for a file setting

    try:
        found = storage.exists(weights, storage_cfg)
    except OSError as e:  # unreachable endpoint, bad credentials...
        raise BackboneError(f"backbone.weights: cannot read {weights}: {e}") from None
    if not found:
        raise BackboneError(f"backbone.weights: file not found: {weights}")
    return weights
