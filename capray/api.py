"""capray as a library: a trained checkpoint in-process (`Captioner`), and the jobs as functions.

    import capray
    captioner = capray.Captioner.load("outputs/demo/runs/demo/best", strategy="beam")
    for c in captioner.caption(["photo.jpg", open("other.png", "rb").read()]):
        print(c.text, c.log_prob)

    summary = capray.caption("configs/demo.yaml", input="photos/", output="captions/")

The Ray Data building blocks are the jobs' own actor classes, `capray.CaptionPredictor` and
`capray.FeatureExtractor` (see docs/python.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from capray.images import NUM_CELLS, ImageDecodeError
from capray.schema import CaptionConfig, DataConfig, ModelConfig

if TYPE_CHECKING:
    from capray.decoder import Caption
    from capray.schema import Config


def storage_config(storage: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """The `storage` config section from a mapping (e.g. {"endpoint_url": ...}) or None (defaults)."""
    from capray.config import StorageConfig

    base = OmegaConf.structured(StorageConfig)
    return base if storage is None else cast(DictConfig, OmegaConf.merge(base, storage))


class Captioner:
    """A trained capray checkpoint loaded in this process: images -> captions, batched internally."""

    def __init__(
        self,
        checkpoint: str,
        strategy: str = CaptionConfig.strategy,
        beam_size: int = CaptionConfig.beam_size,
        length_alpha: float = CaptionConfig.length_alpha,
        max_length: int = CaptionConfig.max_length,
        batch_size: int = CaptionConfig.batch_size,
        precision: str = ModelConfig.precision,
        max_pixels: int = DataConfig.max_pixels,
        storage: Mapping[str, Any] | DictConfig | None = None,
    ):
        from capray.captioning import CaptionPredictor

        self.storage, self.batch_size, self.max_pixels = storage_config(storage), batch_size, max_pixels
        # The caption job's own actor class: the same checkpoint loading, backbone and decoder.
        self.predictor = CaptionPredictor(
            checkpoint,
            strategy,
            beam_size,
            length_alpha,
            max_length,
            precision=precision,
            storage=self.storage,
            max_pixels=max_pixels,
        )
        self.checkpoint, self.strategy, self.tokenizer = checkpoint, self.predictor.strategy, self.predictor.tokenizer

    @classmethod
    def load(cls, checkpoint: str, strategy: str = CaptionConfig.strategy, **kwargs: Any) -> Captioner:
        """Load a checkpoint (local or s3://, gs://, az://): `strategy` greedy or beam; see `__init__` for the rest."""
        return cls(checkpoint, strategy, **kwargs)

    def caption(self, images: Iterable[Any] | Any, attention: bool = False, on_error: str = "raise") -> list[Caption]:
        """Captions (text, words, log_prob, num_tokens; with `attention`, each word's 64 attention
        weights) of images given as paths/URIs, encoded bytes, PIL images or uint8 arrays.

        A bad image (unreadable, not an image, too large, of an unsupported type) raises for the
        whole call (`on_error="raise"`, naming its position), or, with `on_error="keep"`, gets a
        Caption of its own with `error` set and no text, as the jobs give it an error row."""
        from capray.decoder import Caption

        if on_error not in ("raise", "keep"):
            raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'keep'")
        items = [images] if _single(images) else list(images)
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            pixels: list[np.ndarray] = []
            errors: list[str | None] = []
            for j, item in enumerate(chunk):
                try:
                    pixels.append(self._pixels(item, start + j))
                    errors.append(None)
                except (ImageDecodeError, TypeError, OSError) as e:
                    if on_error == "raise":
                        raise
                    errors.append(str(e))
            captions = iter(self.predictor.caption_pixels(np.stack(pixels)) if pixels else [])
            for err in errors:
                if err is not None:
                    out.append(Caption("", [], np.zeros((0, NUM_CELLS), np.float32), float("nan"), 0, None, err))
                    continue
                c = next(captions)
                if not attention:
                    c.attention = c.token_attention = None
                out.append(c)
        return out

    def _pixels(self, image: Any, index: int) -> np.ndarray:
        from capray.batch_model import to_pixels

        try:
            return to_pixels(image, self.storage, self.max_pixels)
        except (ImageDecodeError, TypeError) as e:
            raise type(e)(f"image {index} ({_name(image)}): {e}") from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image {index} ({_name(image)}): not found: {e}") from None


def _single(images: Any) -> bool:
    from PIL import Image

    return isinstance(images, (str, bytes, bytearray, memoryview, Image.Image, np.ndarray, os.PathLike))


def _name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return path if path.strip() else repr(path)  # a blank path shows as '' or ' '
    return type(image).__name__


# --- the jobs as functions -----------------------------------------------------------------------


def config(
    cfg: str | DictConfig | Mapping[str, Any] | Sequence[str] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """A job config: YAML path(s), a loaded config or a mapping, then overrides (`["key=value"]`
    or a nested mapping), checked against the schema as the CLI does."""
    from capray.config import load_config

    layers: list[Any] = list(cfg) if isinstance(cfg, (list, tuple)) else ([] if cfg is None else [cfg])
    if isinstance(overrides, Mapping):
        return load_config([*layers, dict(overrides)] if overrides else layers)
    return load_config(layers, list(overrides))


def _job(job: str, cfg: Config) -> dict[str, Any]:
    """What the CLI does after parsing: the checks before Ray, Ray, the job (and its composition)."""
    from capray.runner import run

    return run(job, cfg)


def extract(cfg: Any = None, input: str | None = None, **overrides: Any) -> dict[str, Any]:
    """`capray extract` from Python: features of the split, or of `input` (any input kind), into
    `<work_dir>/features`; the summary."""
    return _job("extract", config(cfg, _with(overrides, {"extract.input": input})))


def train(cfg: Any = None, **overrides: Any) -> dict[str, Any]:
    """`capray train` from Python (then `evaluate` when `evaluate.after_train`); the summary."""
    return _job("train", config(cfg, _with(overrides, {})))


def caption(
    cfg: Any = None,
    input: str | None = None,
    output: str | None = None,
    checkpoint: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """`capray caption` from Python: caption `input` (any input kind) into `output` (default
    `<work_dir>/captions`) with `checkpoint` (default: the run's best); the summary."""
    return _job(
        "caption", config(cfg, _with(overrides, {"caption.input": input, "output": output, "checkpoint": checkpoint}))
    )


def evaluate(cfg: Any = None, checkpoint: str | None = None, **overrides: Any) -> dict[str, Any]:
    """`capray evaluate` from Python: metrics of a checkpoint (default: the run's best) on the validation split."""
    return _job("evaluate", config(cfg, _with(overrides, {"checkpoint": checkpoint})))


def export(
    cfg: Any = None, output: str | None = None, checkpoint: str | None = None, overwrite: bool = False, **overrides: Any
) -> dict[str, Any]:
    """`capray export` from Python: the checkpoint (default: the run's best) as a SavedModel in `output`."""
    named = {"output": output, "checkpoint": checkpoint, "export.overwrite": overwrite or None}
    return _job("export", config(cfg, _with(overrides, named)))


def _with(overrides: Mapping[str, Any], named: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword overrides (`caption__batch_size=8` or a nested dict) plus the named arguments that were given."""
    out: dict[str, Any] = {k.replace("__", "."): v for k, v in overrides.items()}
    out.update({k: v for k, v in named.items() if v is not None})
    return _nest(out)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested
