"""Encoder backbone loading: imagenet, a .h5 file (local or s3://), random; never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capray import storage
from capray.model import BackboneError, ImageEncoder, build_backbone


@pytest.fixture(scope="module")
def random_backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "inception_random.weights.h5"
    build_backbone("random", seed=5).save_weights(path)
    return path


def test_imagenet_download_failure_names_the_alternatives(tmp_path: Path) -> None:
    # Keras sees an empty cache (KERAS_HOME, read when Keras is imported: a fresh process) and
    # downloads through a proxy that refuses connections, so the download fails on every machine,
    # with a network or without. (Loading real ImageNet weights cannot be tested offline.)
    script = (
        "from capray.model import BackboneError, build_backbone\n"
        "try:\n    build_backbone('imagenet')\nexcept BackboneError as e:\n    print(e)\n"
        "else:\n    print('LOADED')\n"
    )
    refused = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(KERAS_HOME=str(tmp_path / "keras"), https_proxy=refused, HTTPS_PROXY=refused,
               http_proxy=refused, HTTP_PROXY=refused)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not load the ImageNet InceptionV3 weights" in done.stdout, done.stdout[-2000:]
    assert "encoder.weights=random" in done.stdout and "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in done.stdout


def test_weights_file_loads_the_same_backbone(random_backbone_file: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    expected = ImageEncoder("random", seed=5)(pixels)
    loaded = ImageEncoder(str(random_backbone_file))(pixels)
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    other_seed = ImageEncoder("random", seed=6)(pixels)
    assert not np.allclose(other_seed, expected)


def test_weights_file_from_s3(s3, random_backbone_file: Path) -> None:
    cfg = s3.config()
    uri = f"{s3.bucket('models')}/inception_random.weights.h5"
    storage.write_bytes(uri, random_backbone_file.read_bytes(), cfg.storage)
    a = build_backbone(uri, storage=cfg.storage).layers[1].get_weights()[0]
    b = build_backbone(str(random_backbone_file)).layers[1].get_weights()[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("weights, message", [("imagenet21k", "expected 'imagenet', 'random'"), ("/nope/w.h5", "not found")])
def test_bad_weights_setting_is_an_error(weights: str, message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        build_backbone(weights)
