"""Unit tests: the config schema, YAML merge, overrides, rejection, and credential redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from capray.config import ConfigError, from_yaml, load_config, parse_args, to_yaml

REPO = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides_on_top_of_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# test\ntrain:\n  epochs: 7\n  batch_size: 32\n")
    cfg = parse_args([str(path), "train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (3, 32, 1e-3)


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.epochz=3", "train.epochz"),
        ("trainer.epochs=3", "trainer"),
        ("train.epochs=abc", "train.epochs"),
        ("train.batch_size=-1", "train.batch_size"),
        ("data.format=xml", "data.format"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_saved_config_has_no_credentials_and_reloads() -> None:
    cfg = load_config(None, ["storage.access_key_id=AKIDSECRET", "storage.secret_access_key=SECRET123", "train.epochs=4"])
    text = to_yaml(cfg)
    assert "AKIDSECRET" not in text and "SECRET123" not in text
    again = from_yaml(text)
    assert again.train.epochs == 4 and again.storage.secret_access_key == ""


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path: Path) -> None:
    load_config(path)
    header = path.read_text().splitlines()[:4]
    assert header[0].startswith("#") and any("capray" in line or "make" in line for line in header)
