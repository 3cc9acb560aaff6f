"""Encoder backbone loading: imagenet, a .h5 file (local or s3://), random; never a silent fallback."""

from __future__ import annotations

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


def test_imagenet_download_failure_names_the_alternatives() -> None:
    # Offline (this machine, CI) the download fails; with a network or a Keras cache it loads.
    try:
        model = build_backbone("imagenet")
    except BackboneError as e:
        assert "encoder.weights=random" in str(e) and ".h5" in str(e)
    else:
        assert model.output_shape == (None, 8, 8, 2048)


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
