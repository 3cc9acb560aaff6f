"""Loading a job's config: schema defaults, YAML layers, dotted overrides; validated.

The keys, defaults and meanings are in `capray.schema`; `configs/*.yaml` override the defaults
(several files are layered, the later one winning) and the command line overrides those
(`capray train configs/coco2014.yaml configs/gpu-cluster.yaml train.epochs=3`). Unknown keys and
wrong types are errors that name the key and the file; a renamed key is refused with its new name,
while a config saved by an earlier capray (in a checkpoint or an output folder) is read with the
old keys carried over to the new ones (`capray.schema.RENAMED`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capray.hardware import cpu_bf16, resolve_precision
from capray.schema import (
    CHOICES,
    NON_NEGATIVE,
    POSITIVE,
    RENAMED,
    RENAMED_VALUES,
    SECRET_KEYS,
    Config,
    StorageConfig,
)

# Re-exported: the schema's names are part of `capray.config`'s public face.
__all__ = [
    "Config",
    "ConfigError",
    "StorageConfig",
    "cpu_bf16",
    "current_key",
    "from_yaml",
    "load_config",
    "output_paths",
    "parse_args",
    "resolve_precision",
    "save_next_to",
    "to_yaml",
    "updated",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def _validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be > 0")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 0")
    bad = [s for s in cfg.evaluate.strategies if s not in ("greedy", "beam")]
    if bad or not cfg.evaluate.strategies or len(set(cfg.evaluate.strategies)) < len(cfg.evaluate.strategies):
        raise ConfigError(
            f"evaluate.strategies={list(cfg.evaluate.strategies)}: expected a non-empty list of distinct greedy, beam"
        )
    if cfg.text.max_length == 1:
        raise ConfigError("text.max_length=1: must be 0 (longest caption) or >= 2 (room for <start> and <end>)")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be between 0 and 1")
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate={cfg.train.learning_rate}: must be > 0")
    if cfg.extract.min_actors > cfg.extract.max_actors or cfg.caption.min_actors > cfg.caption.max_actors:
        raise ConfigError("min_actors must not exceed max_actors (extract.*, caption.*)")


def check_training(cfg: Any) -> None:
    """What only training needs of a config (other jobs may share it with other ray.num_workers):
    each worker takes an equal part of every global batch."""
    if cfg.train.batch_size % cfg.ray.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by ray.num_workers={cfg.ray.num_workers} "
            "(each worker takes an equal part of every batch)"
        )


def current_key(key: str) -> str:
    """A dotted key as named today (`caption.strategy` -> `caption.strategy`), for configs and
    settings recorded by an earlier capray."""
    for old, (new, _) in RENAMED.items():
        if "." not in old and key.split(".", 1)[0] == old:
            return f"{new}.{key.split('.', 1)[1]}" if "." in key else new
    return key


def _flat(layer: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a layer, sections included."""
    out: list[str] = []
    if isinstance(layer, DictConfig):
        for key in layer:
            out += [f"{prefix}{key!s}", *_flat(layer[key], f"{prefix}{key!s}.")]
    return out


def _check_renamed(layer: DictConfig, source: str) -> None:
    """Refuse a user's layer that names a key or value by its old name, naming the new one."""
    flat = _flat(layer)
    # Keys first: a key that moved out of a renamed section (infer.glob) names where it went.
    for old, (new, _) in sorted(RENAMED.items(), key=lambda item: "." not in item[0]):
        if old in flat:
            if "." not in old:  # a section: name the first key under it, the one the user wrote
                inner = next((k for k in flat if k.startswith(f"{old}.")), old)
                raise ConfigError(f"{source}: {inner} was renamed {current_key(inner)} (section {old}: is now {new}:)")
            raise ConfigError(f"{source}: {old} was replaced by {new}")
    for (key, value), new_value in RENAMED_VALUES.items():
        if key in flat and OmegaConf.select(layer, key) == value:
            raise ConfigError(f"{source}: {key}={value} was renamed {key}={new_value}")


def _carry_renamed(saved: DictConfig) -> None:
    """Bring a config saved by an earlier capray to today's keys, keeping what it meant."""
    for old, (new, how) in RENAMED.items():
        if "." not in old:
            if isinstance(saved.get(old), DictConfig):
                section = saved.pop(old)
                merged = OmegaConf.merge(section, saved.get(new) or {})
                saved[new] = merged
            continue
        section, key = current_key(old).split(".")
        if not (isinstance(saved.get(section), DictConfig) and key in saved[section]):
            continue
        value = saved[section].pop(key)
        if how == "drop":
            continue
        new_key = new.split(" ", 1)[0]
        if OmegaConf.select(saved, new_key) is None:
            OmegaConf.update(saved, new_key, value if how == "same" else how(value), force_add=True)
    for (key, value), new_value in RENAMED_VALUES.items():
        if OmegaConf.select(saved, key) == value:
            OmegaConf.update(saved, key, new_value)


def _scalar_section(overrides: Sequence[str]) -> str | None:
    """The override that puts a value where a section belongs (`train=3`), which OmegaConf's
    merge error does not name."""
    sections = {f.name for f in fields(Config) if f.default_factory is not MISSING}
    for item in overrides:
        if item.split("=", 1)[0] in sections:
            return item.split("=", 1)[0]
    return None


def _load_yaml(path: str | Path) -> DictConfig:
    """One YAML layer, refused with its path named when it is missing, unparseable or not a mapping."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, train:, ...), got a list")
    _check_renamed(loaded, str(path))
    return loaded


def _merge_error(e: OmegaConfBaseException, source: str | None, key: str | None = None) -> ConfigError:
    key = getattr(e, "full_key", None) or key
    where = f" (key '{key}')" if key else ""
    prefix = f"{source}: " if source else ""
    reason = str(e).splitlines()[0]
    if "is not a ListConfig" in reason:  # OmegaConf's words for a scalar given to a list field
        reason = "expected a list, e.g. [jpg, png] (quoted in a shell: 'inputs.extensions=[jpg,png]')"
    return ConfigError(f"{prefix}invalid config{where}: {reason}")


def load_config(
    paths: str | Path | DictConfig | Mapping | Sequence[str | Path | DictConfig | Mapping] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Schema defaults, then each layer in order (later wins): a YAML file, or a mapping / loaded
    config (the Python API), then `key=value` overrides; validated."""
    if paths is None or isinstance(paths, (str, Path, DictConfig, Mapping)):
        paths = [paths] if paths else []  # "" as None: no file, as before layering
    cfg = OmegaConf.structured(Config)
    # Merged one layer at a time so that an unknown key or a wrong type names the file it is in.
    for path in paths:
        source = str(path) if isinstance(path, (str, Path)) else "config given"
        layer = cast(
            DictConfig,
            _load_yaml(path)
            if isinstance(path, (str, Path))
            else OmegaConf.create(OmegaConf.to_container(path) if isinstance(path, DictConfig) else cast(Any, path)),
        )
        _check_renamed(layer, source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _merge_error(e, source) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except yaml.YAMLError as e:
        # Values are parsed as YAML: `*.jpg` reads as an alias and needs quotes ('*.jpg').
        raise ConfigError(
            f"override not parseable as YAML ({str(e).splitlines()[0]}); quote the value, e.g. inputs.glob=\"'*.jpg'\""
        ) from None
    except OmegaConfBaseException as e:
        raise _merge_error(e, None, _scalar_section(overrides)) from None
    _check_renamed(dotlist, "override")
    try:
        cfg = OmegaConf.merge(cfg, dotlist)
    except OmegaConfBaseException as e:
        raise _merge_error(e, None, _scalar_section(overrides)) from None
    cfg = cast(DictConfig, cfg)
    OmegaConf.set_readonly(cfg, False)
    _validate(cfg)
    _absolute_paths(cfg)
    # A DictConfig that behaves as the schema's dataclass: typed so that the type checker checks
    # every `cfg.<section>.<key>` of the code against the schema.
    typed = cast(Config, cfg)
    # Decided once, here, so that every process of every job of a run uses the same policy.
    typed.model.precision = resolve_precision(typed)
    return typed


def updated(cfg: Config, changes: Mapping[str, Any]) -> Config:
    """A copy of a loaded config with `changes` (a nested mapping) merged in: how a job derives the
    config of the job it runs next (the demo's captioning, the audit's planning). An old key name
    is refused with its new one, as in a user's config."""
    layer = OmegaConf.create(dict(changes))
    _check_renamed(layer, "changes")
    return cast(Config, OmegaConf.merge(cfg, layer))


# Local paths in these keys are made absolute where the config is loaded: Ray workers run in
# other directories, and image keys must not depend on where a job was started. A leading `~` is
# the user's home, as in a shell (which does not expand it in `caption.input=~/photos`).
_PATH_KEYS = (
    "work_dir",
    "output",
    "checkpoint",
    "data.annotations",
    "data.images",
    "caption.input",
    "extract.input",
    "backbone.weights",
)


def _absolute_paths(cfg: DictConfig) -> None:
    from capray.storage import unsupported

    for key in _PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and (why := unsupported(value)):
            raise ConfigError(f"{key}={why}")
        if not value or "://" in value or (key == "backbone.weights" and not value.endswith(".h5")):
            continue
        OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)))


def parse_args(argv: Sequence[str]) -> Config:
    """CLI form: YAML paths first (merged in order, later wins), then `key=value` overrides."""
    argv = list(argv)
    # Every argument before the first `key=value` is a file: the rest must all be overrides, so a
    # stray word after an override is refused as one rather than loaded as a file.
    first_override = next((i for i, item in enumerate(argv) if "=" in item), len(argv))
    return load_config(argv[:first_override], argv[first_override:])


def redacted(cfg: Config | DictConfig) -> DictConfig:
    """A copy with credentials blanked, safe to write next to outputs."""
    out = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    for key in SECRET_KEYS:
        if out.storage.get(key):
            out.storage[key] = ""
    return out


def to_yaml(cfg: Config | DictConfig) -> str:
    """The resolved config as YAML, credentials removed."""
    return OmegaConf.to_yaml(redacted(cfg))


def from_yaml(text: str) -> Config:
    """Parse a saved config (a checkpoint's, an output folder's) back through the schema; keys
    renamed since it was written are carried over with their meaning (`schema.RENAMED`)."""
    saved = OmegaConf.create(text)
    if not isinstance(saved, DictConfig):
        raise ConfigError("invalid saved config: not a mapping")
    _carry_renamed(saved)
    try:
        return cast(Config, OmegaConf.merge(OmegaConf.structured(Config), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid saved config: {str(e).splitlines()[0]}") from None


def output_paths(cfg: Config) -> dict[str, str]:
    """Where each stage reads and writes: everything lives under `work_dir`."""
    from capray.storage import join

    root = cfg.work_dir
    return {
        "data": join(root, "data"),
        "heldout": join(root, "heldout"),
        "split": join(root, "split.parquet"),
        "features": join(root, "features"),
        "inputs": join(root, "inputs"),
        "tokenizer": join(root, "tokenizer.json"),
        "stats": join(root, "feature_stats.json"),
        "runs": join(root, "runs"),
        "best": join(root, "runs", cfg.name, "best.json"),
        "best_checkpoint": join(root, "runs", cfg.name, "best"),
        "tensorboard": join(root, "runs", cfg.name, "tensorboard"),
        "captions": cfg.output or join(root, "captions"),
    }


def save_next_to(cfg: Config, output_dir: str) -> str:
    """Write the resolved config (no credentials) as `_capray_config.yaml` inside an output folder.

    The leading underscore keeps Parquet readers (pyarrow, Ray Data) from taking it for data.
    """
    from capray.storage import join, write_bytes

    uri = join(output_dir, "_capray_config.yaml")
    write_bytes(uri, to_yaml(cfg).encode("utf-8"), cfg.storage)
    return uri
