"""Unit tests: Show, Attend and Tell shapes, the padding mask, greedy decoding, weight round trip."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from capray.model import Captioner, caption_loss, make_optimizer

B, V = 3, 12


@pytest.fixture(scope="module")
def model() -> Captioner:
    return Captioner(V).build_all()


def _features(seed: int = 0, n: int = B) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64, 2048), dtype=np.float32)


def test_layer_shapes_are_the_papers(model: Captioner) -> None:
    # Drop the model's own name: Keras numbers it (captioner_1, ...) per process.
    shapes = {"captioner/" + w.path.split("/", 1)[1]: tuple(w.shape) for w in model.weights}
    assert shapes["captioner/encoder/kernel"] == (2048, 256)
    assert shapes["captioner/W1/kernel"] == (256, 512)  # W1
    assert shapes["captioner/attention/W2/kernel"] == (512, 512)  # W2 (on the GRU state)
    assert shapes["captioner/attention/V/kernel"] == (512, 1)  # V
    assert shapes["captioner/embedding/embeddings"] == (V, 256)
    assert shapes["captioner/gru/kernel"] == (512, 3 * 512)  # input: context 256 + embedding 256
    assert shapes["captioner/fc1/kernel"] == (512, 512)
    assert shapes["captioner/fc2/kernel"] == (512, V)


def test_teacher_forcing_output_shapes(model: Captioner) -> None:
    captions = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 4, 4, 4, 3]], np.int32)
    logits, attention = model(_features(), captions)
    assert logits.shape == (B, 4, V)
    assert attention.shape == (B, 4, 64)
    np.testing.assert_allclose(tf.reduce_sum(attention, -1).numpy(), 1.0, rtol=1e-5)


def test_greedy_output_shapes_and_max_length(model: Captioner) -> None:
    tokens, attention, log_prob, lengths = model.greedy(_features(), max_steps=4)
    assert tokens.shape == (B, 4) and tokens.dtype == tf.int32
    assert attention.shape == (B, 4, 64)
    assert log_prob.shape == (B,) and lengths.shape == (B,)
    assert (lengths.numpy() <= 4).all() and (log_prob.numpy() <= 0).all()


def test_extra_padding_does_not_change_the_loss(model: Captioner) -> None:
    captions = np.array([[2, 5, 6, 3], [2, 7, 3, 0], [2, 4, 3, 0]], np.int32)
    padded = np.pad(captions, [(0, 0), (0, 5)])
    loss, tokens = caption_loss(captions, model(_features(), captions)[0])
    loss_p, tokens_p = caption_loss(padded, model(_features(), padded)[0])
    assert float(tokens) == float(tokens_p) == 7.0
    assert float(loss) == pytest.approx(float(loss_p), rel=1e-5)


def _train_two_captions() -> tuple[Captioner, np.ndarray, np.ndarray]:
    features = _features(1, 2)
    captions = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]], np.int32)
    keras.utils.set_random_seed(0)
    model = Captioner(8, embedding_dim=16, units=32).build_all()
    opt = make_optimizer(1e-2)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss, _ = caption_loss(captions, model(features, captions, training=True)[0])
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(100)]
    assert losses[-1] < 0.05 * losses[0]
    return model, features, captions


def test_greedy_stops_at_end_and_keeps_attention_per_word(tmp_path: Path) -> None:
    model, features, _ = _train_two_captions()
    tokens, attention, _, lengths = (t.numpy() for t in tf.function(lambda f: model.greedy(f, 10))(features))
    assert tokens.tolist() == [[5, 6, 3] + [0] * 7, [7, 3] + [0] * 8]
    assert lengths.tolist() == [3, 2]
    np.testing.assert_allclose(attention[0, :3].sum(-1), 1.0, rtol=1e-5)
    assert not attention[0, 3:].any() and not attention[1, 2:].any()

    # Saved weights (including the feature statistics) rebuild a model that decodes identically.
    model.set_feature_stats(np.full(2048, 0.5), np.full(2048, 2.0))
    before = model.greedy(features, 10)[0].numpy()
    model.save_weights(tmp_path / "m.weights.h5")
    again = Captioner(8, embedding_dim=16, units=32).build_all()
    again.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(again.feature_std.numpy(), 2.0)
    np.testing.assert_array_equal(again.greedy(features, 10)[0].numpy(), before)
