"""capray: distributed batch image captioning (Show, Attend and Tell) on Ray.

Keras choice, made once here: Keras 3 on the TensorFlow backend (what `tf.keras` is since TF 2.16).
`tf_keras` is the frozen Keras 2 kept for old code; Keras 3 layers and optimizers work inside
`tf.distribute` custom loops (MultiWorkerMirroredStrategy) and `tf.function`, which is all the
training and inference code needs, and it is the line that receives fixes.
"""

import logging
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's CUDA/oneDNN start-up banners ignore TF_CPP_MIN_LOG_LEVEL: filter them out of
# whichever import of TensorFlow comes first in this process (imports nothing heavy).
from capray import tfquiet

tfquiet.install()

# The library logs, the application decides what to show (capray.logs): nothing until it
# configures logging, not even Python's last-resort printing of warnings.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# The public names (docs/python.md), imported on first use: `import capray` stays light (no Ray,
# no TensorFlow) for the CLI, the Ray Data tasks and users who need one function.
_PUBLIC = {
    "Captioner": "capray.api",
    "caption": "capray.api",
    "extract": "capray.api",
    "CaptionPredictor": "capray.captioning",
    "FeatureExtractor": "capray.extraction",
    "Caption": "capray.decoder",
}
__all__ = sorted(_PUBLIC)


def lazy_getattr(namespace: dict, homes: dict):
    """A module `__getattr__` (PEP 562) that imports each name of `homes` (name -> module) on
    first use and keeps it in `namespace`, the module's globals()."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(homes[name]), name)
        namespace[name] = value
        return value

    return __getattr__


__getattr__ = lazy_getattr(globals(), _PUBLIC)
