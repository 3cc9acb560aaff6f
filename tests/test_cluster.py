"""Deployment files: cluster.yaml against Ray's launcher schema (no cloud contacted) and every
config in configs/ through the capray schema."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from capray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(cluster: dict) -> dict:
    """What `ray up` does to the file before touching AWS: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_ray_launcher_schema() -> None:
    prepared = _validate(_cluster())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_the_launcher_validation_rejects_a_misspelt_key() -> None:
    # Shows the check above has teeth: the same call refuses what `ray up` would refuse.
    import jsonschema

    broken = _cluster()
    broken["available_node_types"]["gpu_worker"]["max_workerz"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        _validate(broken)


def test_cluster_yaml_has_gpu_workers_a_cpu_head_and_no_keys() -> None:
    cluster, text = _cluster(), (REPO / "cluster.yaml").read_text()
    types = cluster["available_node_types"]
    assert re.fullmatch(r"(g[4-6]|p[3-5])\w*\.\w+", types["gpu_worker"]["node_config"]["InstanceType"])
    assert not re.match(r"[gp]\d", types["head"]["node_config"]["InstanceType"])
    assert types["gpu_worker"]["min_workers"] == 0  # GPUs only while there is work
    # Not the 4-vCPU g5.xlarge: decoding on 4 vCPUs would leave the A10G idle most of the time.
    assert types["gpu_worker"]["node_config"]["InstanceType"] != "g5.xlarge"
    # CPU workers of a generation with AMX/AVX512-BF16, which the CPU config's bfloat16 needs.
    assert re.fullmatch(r"[cmr]7i\.\w+", types["cpu_worker"]["node_config"]["InstanceType"])
    assert "instance-profile/" in types["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    for word in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "secret_access_key:"):
        assert word not in text


def test_cluster_yaml_pins_this_capray_version_and_cuda_tensorflow() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wheel = f"capray-{project['version']}-py3-none-any.whl"
    cluster = _cluster()
    sources = list(cluster["file_mounts"].values())
    assert sources == [f"dist/{wheel}"], f"cluster.yaml must mount dist/{wheel} (pyproject version); run `make wheel`"
    setup = "\n".join(cluster["setup_commands"])
    assert f"pip install -q ~/wheels/{wheel}" in setup
    tf_pin = re.search(r"tensorflow\[and-cuda\]==([\d.]+)", setup).group(1)
    ray_pin = re.search(r"ray\[[\w,]+\]==([\d.]+)", setup).group(1)
    deps = " ".join(project["dependencies"])
    assert tf_pin.startswith(re.search(r"tensorflow>=([\d.]+)", deps).group(1))
    assert ray_pin.startswith(re.search(r"ray\[[\w,]+\]>=([\d.]+)", deps).group(1))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_its_header_gives_the_command(path: Path) -> None:
    cfg = load_config(path)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name}: must start with a comment saying what it is for and how to run it"
    commands = [line for line in header if re.search(r"(make |capray |jobs/\w+\.py )", line)]
    assert commands, f"{path.name}: the header must give the exact command"
    for line in commands:
        if "jobs/" in line or "capray " in line:
            assert f"configs/{path.name}" in line, f"{path.name}: header command runs another file: {line}"
    assert cfg.name


def test_cluster_configs_use_gpu_actors_and_workers() -> None:
    coco = [REPO / "configs/coco2014.yaml", REPO / "configs/coco2014-s3.yaml"]
    cfg = load_config([*coco, REPO / "configs/gpu-cluster.yaml"])
    for stage in (cfg.extract, cfg.caption):
        # Two actors per GPU (fractional num_gpus), each with its decode threads.
        assert stage.num_gpus == 0.5 and stage.min_actors < stage.max_actors
    assert cfg.inputs.io_threads > 4
    assert cfg.ray.use_gpu and cfg.ray.num_workers > 1
    assert cfg.model.precision == "mixed_float16" and cfg.model.jit_compile
    assert cfg.work_dir.startswith("s3://") and not cfg.storage.access_key_id
    cpu = load_config([*coco, REPO / "configs/cpu-cluster.yaml"])
    assert cpu.extract.num_gpus == cpu.caption.num_gpus == 0 and not cpu.ray.use_gpu
    assert cpu.model.precision == "mixed_bfloat16" and not cpu.model.jit_compile


def test_cluster_yaml_names_config_files_that_exist() -> None:
    # Its header tells how to submit jobs; a renamed config must not leave it pointing nowhere.
    named = re.findall(r"configs/[\w.-]+\.yaml", (REPO / "cluster.yaml").read_text())
    assert named and all((REPO / name).is_file() for name in named), named
