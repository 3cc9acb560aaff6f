"""Unit tests: the config schema, YAML layers, overrides, rejection, credential redaction, shipped configs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capray.config import (
    SECRET_KEYS,
    Config,
    ConfigError,
    from_yaml,
    load_config,
    output_paths,
    parse_args,
    redacted,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs").glob("*.yml")])


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# --- defaults, merge order --------------------------------------------------------------------


def test_defaults_load_from_the_schema() -> None:
    cfg = load_config()
    schema = OmegaConf.structured(Config)
    schema.work_dir = os.path.abspath(schema.work_dir)  # local paths are made absolute on load
    assert _plain(cfg) == _plain(schema)
    assert _plain(parse_args([])) == _plain(cfg) == _plain(load_config(None, []))
    # The defaults that the model card fixes (the seed's vocabulary and sizes, ImageNet weights);
    # the other defaults are choices the schema documents, not restated here.
    assert (cfg.text.vocab_size, cfg.model.embedding_dim, cfg.model.units) == (5000, 256, 512)
    assert cfg.backbone.weights == "imagenet" and cfg.storage.secret_access_key == ""
    cfg.train.epochs = 2  # the loaded config is writable (jobs adjust it)
    assert cfg.train.epochs == 2


def test_yaml_file_merges_over_defaults_and_overrides_win(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "# test\nname: mine\ntrain:\n  epochs: 7\n  batch_size: 32\nmodel:\n  units: 128\n")
    from_file = load_config(path)
    assert (from_file.name, from_file.train.epochs, from_file.train.batch_size, from_file.model.units) == (
        "mine",
        7,
        32,
        128,
    )
    assert from_file.train.learning_rate == 1e-3 and from_file.model.embedding_dim == 256  # untouched defaults
    cfg = load_config(str(path), ["train.epochs=3", "model.units=64", "model.units=96"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.units) == (3, 32, 96)  # last override wins
    assert cfg.name == "mine"


def test_overrides_are_converted_to_the_schema_types() -> None:
    cfg = load_config(None, ["train.learning_rate=5e-4", "train.shuffle=false", "ray.cpus_per_worker=2", "name=123"])
    assert cfg.train.learning_rate == pytest.approx(5e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.shuffle is False
    assert cfg.ray.cpus_per_worker == 2.0 and isinstance(cfg.ray.cpus_per_worker, float)
    assert cfg.name == "123" and isinstance(cfg.name, str)


def test_parse_args_takes_optional_yaml_paths_then_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  epochs: 7\n  batch_size: 32\n")
    cfg = parse_args([str(path), "train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 32)
    cfg = parse_args(["train.epochs=3", "data.format=coco"])  # no path: overrides only
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.format) == (3, 64, "coco")


def test_yaml_files_are_layered_in_order_and_overrides_win(tmp_path: Path) -> None:
    data = _yaml(tmp_path, "name: base\ntrain:\n  epochs: 7\n  batch_size: 32\nmodel:\n  units: 128\n", "data.yaml")
    cluster = _yaml(tmp_path, "train:\n  batch_size: 256\nray:\n  num_workers: 4\n", "cluster.yaml")
    cfg = load_config([data, cluster])
    assert (cfg.name, cfg.train.epochs, cfg.model.units) == ("base", 7, 128)  # kept from the first file
    assert (cfg.train.batch_size, cfg.ray.num_workers) == (256, 4)  # the later file wins
    assert load_config([cluster, data]).train.batch_size == 32  # order matters
    cfg = parse_args([str(data), str(cluster), "train.batch_size=8", "name=cli"])
    assert (cfg.train.batch_size, cfg.name, cfg.train.epochs, cfg.ray.num_workers) == (8, "cli", 7, 4)
    assert _plain(load_config(data)) == _plain(load_config([data])) == _plain(parse_args([str(data)]))


def test_unknown_key_in_a_later_file_is_refused_naming_that_file(tmp_path: Path) -> None:
    good = _yaml(tmp_path, "train:\n  epochs: 7\n", "good.yaml")
    bad = _yaml(tmp_path, "ray:\n  num_workerz: 4\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*ray\.num_workerz") as info:
        parse_args([str(good), str(bad), "train.epochs=3"])
    assert "good.yaml" not in str(info.value)
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochs"):
        load_config([good, _yaml(tmp_path, "train:\n  epochs: many\n", "bad.yaml")])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        parse_args([str(good), str(tmp_path / "nope.yaml")])


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert _plain(load_config(_yaml(tmp_path, "# nothing set\n"))) == _plain(load_config())


# --- rejection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.epochz=1", "train.epochz"),  # unknown key
        ("trainer.epochs=3", "trainer"),  # unknown top-level section
        ("train.epochs=abc", "train.epochs"),  # wrong type
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=null", "train.epochs"),
        ("train.shuffle=maybe", "train.shuffle"),
        ("train.batch_size=-1", "train.batch_size"),  # must be > 0
        ("train.batch_size=0", "train.batch_size"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("text.max_length=-1", "text.max_length"),  # must be >= 0
        ("text.max_length=1", "text.max_length"),  # no room for <start> and <end>
        ("data.format=xml", "data.format"),  # not one of the choices
        ("model.feature_norm=batch", "model.feature_norm"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("storage.retries=-1", "storage.retries"),  # no try at all
        ("storage.retry_wait_s=-1", "storage.retry_wait_s"),
        ("status.every_s=0", "status.every_s"),  # a heartbeat in a busy loop
        ("status.every_shards=0", "status.every_shards"),
        ("status.stale_periods=0", "status.stale_periods"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_a_batch_the_training_workers_cannot_share_is_refused_before_training_only() -> None:
    # It failed in every training worker (a ValueError each), after Ray and the datasets started.
    from capray.config import check_training

    cfg = load_config(None, ["train.batch_size=77", "ray.num_workers=2"])  # extract and caption may share it
    with pytest.raises(ConfigError, match=r"train\.batch_size=77 must be divisible by ray\.num_workers=2"):
        check_training(cfg)
    check_training(load_config(None, ["train.batch_size=78", "ray.num_workers=2"]))


def test_a_scalar_for_a_list_is_refused_with_the_list_syntax() -> None:
    with pytest.raises(ConfigError, match=r"key 'inputs\.extensions'\): expected a list, e\.g\. \[jpg, png\]"):
        load_config(None, ["inputs.extensions=jpg"])


def test_choice_errors_list_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="synthetic, coco, flickr, table"):
        load_config(None, ["data.format=xml"])


@pytest.mark.parametrize(
    "text, names",
    [
        ("train:\n  epochz: 1\n", "train.epochz"),
        ("trainer:\n  epochs: 3\n", "trainer"),
        ("train:\n  epochs: abc\n", "train.epochs"),
        ("train:\n  batch_size: -8\n", "train.batch_size"),
        ("data:\n  format: xml\n", "data.format"),
    ],
)
def test_bad_yaml_files_are_refused_naming_the_key(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(_yaml(tmp_path, text))


def test_the_yaml_file_is_validated_even_when_an_override_fixes_it(tmp_path: Path) -> None:
    # Overrides are merged after the file, so a valid override repairs an invalid value...
    path = _yaml(tmp_path, "train:\n  batch_size: -8\n")
    assert load_config(path, ["train.batch_size=8"]).train.batch_size == 8
    # ...but an unknown key in the file is an error whatever comes after it.
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(_yaml(tmp_path, "train:\n  epochz: 1\n", "d.yaml"), ["train.epochs=1"])


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="'train.epochs'"):
        parse_args(["train.epochs=3", "train.epochs"])


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args([str(missing), "train.epochs=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)  # a directory is not a config file


@pytest.mark.parametrize("text", ["- train\n- epochs\n", "train: [\n"], ids=["list", "syntax"])
def test_unusable_yaml_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    # Regression: a YAML list raised TypeError and a syntax error yaml's ParserError, which the
    # CLI (it catches ConfigError) showed as a traceback.
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_scalar_in_place_of_a_section_is_refused_naming_it() -> None:
    # Regression: OmegaConf's merge error has no full_key, so the message did not name 'train'.
    with pytest.raises(ConfigError, match=r"\btrain\b"):
        load_config(None, ["train=3"])


# --- saved configs and credentials ------------------------------------------------------------


def _with_secrets():
    return load_config(
        None,
        [
            "storage.access_key_id=AKIDSECRET",
            "storage.secret_access_key=SECRET123",
            "storage.session_token=TOKENSECRET",
            "storage.endpoint_url=http://127.0.0.1:9000",
            "storage.region=eu-west-1",
            "train.epochs=4",
            "name=run7",
        ],
    )


def test_to_yaml_removes_credentials() -> None:
    cfg = _with_secrets()
    text = to_yaml(cfg)
    for secret in ("AKIDSECRET", "SECRET123", "TOKENSECRET"):
        assert secret not in text
    assert "http://127.0.0.1:9000" in text and "eu-west-1" in text  # not secrets
    assert cfg.storage.secret_access_key == "SECRET123"  # the live config keeps them
    assert all(redacted(cfg).storage[key] == "" for key in SECRET_KEYS)


def test_from_yaml_of_to_yaml_is_the_config_without_its_credentials() -> None:
    cfg = _with_secrets()
    again = from_yaml(to_yaml(cfg))
    expected = _plain(cfg)
    for key in SECRET_KEYS:
        expected["storage"][key] = ""
    assert _plain(again) == expected
    assert (again.train.epochs, again.name, again.storage.region) == (4, "run7", "eu-west-1")
    assert _plain(from_yaml(to_yaml(load_config()))) == _plain(load_config())  # no secrets: identical


def test_from_yaml_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="epochz"):
        from_yaml("train:\n  epochz: 1\n")


@pytest.mark.parametrize(
    "layer, message",
    [
        ("encoder:\n  weights: random\n", "encoder.weights was renamed backbone.weights"),
        ("infer:\n  input: photos\n", "infer.input was renamed caption.input"),
        ("data:\n  format: manifest\n", "data.format=manifest was renamed data.format=table"),
    ],
)
def test_a_users_config_with_a_renamed_key_is_told_the_new_name(tmp_path: Path, layer: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"c.yaml: {re.escape(message)}"):
        load_config(_yaml(tmp_path, layer))
    override = message.split(" was ")[0]
    override = override if "=" in override else f"{override}=x"
    with pytest.raises(ConfigError, match=f"override: {re.escape(message.split(' was ')[0])}"):
        load_config(None, [override])


def test_a_config_saved_before_a_rename_keeps_its_meaning() -> None:
    # A checkpoint trained on a random backbone must not come back as an imagenet one.
    saved = from_yaml(
        "encoder:\n  weights: random\n  seed: 7\ninfer:\n  strategy: beam\n  limit: 3\n"
        "data:\n  format: manifest\nmodel:\n  mixed_precision: true\n"
    )
    assert (saved.backbone.weights, saved.backbone.seed) == ("random", 7)
    assert saved.caption.strategy == "beam" and saved.data.format == "table"
    assert saved.model.precision == "mixed_float16"  # the old boolean's meaning
    assert "encoder" not in saved and "infer" not in saved
    assert from_yaml("model:\n  mixed_precision: false\n").model.precision == "float32"


def test_settings_recorded_under_old_names_compare_under_the_new_ones() -> None:
    from capray.config import current_key

    assert current_key("infer.strategy") == "caption.strategy"
    assert current_key("encoder.weights") == "backbone.weights"
    assert current_key("model.precision") == "model.precision"


def test_output_paths_live_under_work_dir() -> None:
    paths = output_paths(load_config(None, ["work_dir=s3://bucket/w", "name=r1"]))
    assert all(p.startswith("s3://bucket/w/") for p in paths.values()), paths
    assert paths["tokenizer"] == "s3://bucket/w/tokenizer.json"
    assert paths["best"] == "s3://bucket/w/runs/r1/best.json"
    assert paths["captions"] == "s3://bucket/w/captions"
    assert output_paths(load_config(None, ["output=/tmp/out"]))["captions"] == "/tmp/out"


# --- shipped configs --------------------------------------------------------------------------


def test_there_are_shipped_configs() -> None:
    assert SHIPPED, "configs/ has no YAML files"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_survives_the_saved_config_round_trip(path: Path) -> None:
    # Its header is checked by tests/test_cluster.py.
    cfg = load_config(path)
    assert _plain(from_yaml(to_yaml(cfg))) == _plain(redacted(cfg))


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_sets_only_what_differs_from_the_schema(path: Path) -> None:
    # The schema is the one place for defaults: a restated default would silently stop following
    # a change of the schema.
    load_config(path)
    defaults = _leaves(_plain(OmegaConf.structured(Config)))
    restated = [key for key, value in _leaves(_plain(OmegaConf.load(path))).items() if defaults.get(key) == value]
    assert not restated, f"{path.name} restates schema defaults (remove them): {restated}"


def test_the_cluster_layers_compose_with_a_dataset() -> None:
    layers = [REPO / "configs/coco2014.yaml", REPO / "configs/coco2014-s3.yaml"]
    gpu = load_config([*layers, REPO / "configs/gpu-cluster.yaml"])
    cpu = load_config([*layers, REPO / "configs/cpu-cluster.yaml"])
    for cfg in (gpu, cpu):
        assert cfg.data.format == "coco" and cfg.evaluate.after_train  # from configs/coco2014.yaml
        assert cfg.data.images.startswith("s3://") and cfg.work_dir.startswith("s3://")
    assert gpu.data.num_examples == 0 and cpu.data.num_examples == 30000


def test_local_paths_become_absolute_so_workers_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "work_dir=outputs/x",
            "caption.input=photos",
            "backbone.weights=w/inception.h5",
            "data.annotations=s3://b/captions.csv",
        ],
    )
    assert cfg.work_dir == str(tmp_path / "outputs/x") and cfg.caption.input == str(tmp_path / "photos")
    assert cfg.backbone.weights == str(tmp_path / "w/inception.h5")
    assert cfg.data.annotations == "s3://b/captions.csv" and cfg.output == ""
    assert load_config(None, ["backbone.weights=random"]).backbone.weights == "random"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(None, ["caption.input=~/photos"]).caption.input == str(tmp_path / "home" / "photos")


@pytest.mark.parametrize(
    "override, then",
    [
        ("caption.input=https://example.com/photos/", "capray reads no web URLs"),
        ("extract.input=file:///data/photos", "give the local path without file://"),
        ("work_dir=S3://bucket/work", "write it s3://"),
        ("output=s3a://bucket/out", "write it s3://"),
        ("checkpoint=gcs://bucket/best", "write it gs://"),
        ("backbone.weights=hdfs://nn/w.h5", "URI$"),
    ],
)
def test_a_uri_of_another_scheme_is_refused_not_taken_for_a_local_folder(override: str, then: str) -> None:
    # Taken for a relative path, `work_dir=S3://b/w` was written to ./S3:/b/w without a word.
    with pytest.raises(ConfigError, match=f"^{re.escape(override)}: not a local path or an s3://, .*{then}"):
        load_config(None, [override])


def test_auto_precision_is_decided_where_the_config_is_loaded() -> None:
    from capray.hardware import cpu_bf16

    on_cpu = load_config(None, ["model.precision=auto"]).model.precision
    assert on_cpu == ("mixed_bfloat16" if cpu_bf16() else "float32")
    for gpus in ("ray.use_gpu=true", "extract.num_gpus=1", "caption.num_gpus=1"):
        assert load_config(None, ["model.precision=auto", gpus]).model.precision == "mixed_float16", gpus
