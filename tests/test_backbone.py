"""Backbone (InceptionV3) weights loading: imagenet (Keras' cached file, fetched once), a .h5 file (local or
s3://), random; never a silent fallback."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from capray import backbone, storage
from capray.model import Backbone, BackboneError, build_backbone


@pytest.fixture(scope="module")
def random_backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "inception_random.weights.h5"
    build_backbone("random", seed=5).save_weights(path)
    return path


REFUSED = "http://127.0.0.1:9/" + backbone.WEIGHTS_FILE  # nothing listens on port 9 (discard)


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache for this test; returns the folder the weights file goes in."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


@pytest.fixture
def weights_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A local HTTP server standing in for Keras' weights URL; counts the downloads."""
    served = {"body": b"not really InceptionV3 weights", "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served["requests"] += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(backbone, "WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/{backbone.WEIGHTS_FILE}")
    monkeypatch.setattr(backbone, "WEIGHTS_MD5", hashlib.md5(served["body"]).hexdigest())
    yield served
    server.shutdown()


def test_imagenet_offline_is_one_line_naming_the_alternatives(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backbone, "WEIGHTS_URL", REFUSED)
    with pytest.raises(BackboneError) as e:
        backbone.check("imagenet")
    message = str(e.value)
    assert "\n" not in message and message.startswith("could not load the ImageNet InceptionV3 weights")
    assert f"not in the Keras cache {keras_home}" in message and "Connection refused" in message
    assert (
        f"give a local or object-storage (s3://, gs://, az://) copy of the no-top weights file with backbone.weights=/path/{backbone.WEIGHTS_FILE}"
        in message
    )
    assert "backbone.weights=random" in message
    assert list(keras_home.iterdir()) == []  # no partial file left behind


def test_imagenet_weights_are_fetched_once_into_the_keras_cache(keras_home: Path, weights_server: dict) -> None:
    path = backbone.check("imagenet")
    assert path == str(keras_home / backbone.WEIGHTS_FILE) and Path(path).read_bytes() == weights_server["body"]
    assert backbone.check("imagenet") == path and weights_server["requests"] == 1
    assert os.listdir(keras_home) == [backbone.WEIGHTS_FILE]


def test_a_corrupt_download_is_refused_and_not_cached(keras_home: Path, weights_server: dict) -> None:
    weights_server["body"] = b"truncated"
    with pytest.raises(BackboneError, match="md5"):
        backbone.check("imagenet")
    assert list(keras_home.iterdir()) == []


def test_the_backbone_loads_the_cached_file_without_downloading(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an actor does after the driver's check: the cached file, the network unreachable.
    keras_home.mkdir(parents=True)
    (keras_home / backbone.WEIGHTS_FILE).write_bytes(b"cached")
    monkeypatch.setattr(backbone, "WEIGHTS_MD5", hashlib.md5(b"cached").hexdigest())
    monkeypatch.setattr(backbone, "WEIGHTS_URL", REFUSED)
    loaded = []
    monkeypatch.setattr(keras.applications, "InceptionV3", lambda weights, **kwargs: loaded.append(weights) or "model")
    assert build_backbone("imagenet") == "model"
    assert loaded == [str(keras_home / backbone.WEIGHTS_FILE)]


def test_weights_file_loads_the_same_backbone(random_backbone_file: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    expected = Backbone("random", seed=5)(pixels)
    loaded = Backbone(str(random_backbone_file))(pixels)
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    other_seed = Backbone("random", seed=6)(pixels)
    assert not np.allclose(other_seed, expected)


def test_weights_file_from_s3(s3, random_backbone_file: Path) -> None:
    cfg = s3.config()
    uri = f"{s3.bucket('models')}/inception_random.weights.h5"
    storage.write_bytes(uri, random_backbone_file.read_bytes(), cfg.storage)
    a = build_backbone(uri, storage=cfg.storage).layers[1].get_weights()[0]
    b = build_backbone(str(random_backbone_file)).layers[1].get_weights()[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "weights, message", [("imagenet21k", "expected 'imagenet', 'random'"), ("/nope/w.h5", "not found")]
)
def test_bad_weights_setting_is_an_error(weights: str, message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        build_backbone(weights)
    with pytest.raises(BackboneError, match=message):
        backbone.check(weights)  # the driver's check, before any actor starts
