"""Unit tests: Show, Attend and Tell architecture and shapes, the padding mask, greedy decoding,
feature statistics and the weight round trip, learning, and the InceptionV3 backbone."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from capray.model import (
    Backbone,
    BackboneError,
    BahdanauAttention,
    ShowAttendTell,
    attention_penalty,
    build_backbone,
    caption_loss,
    make_optimizer,
)
from capray.text import Tokenizer
from capray.train.loop import make_train_step

B, V = 3, 12
IDS = dict(start_id=Tokenizer.start_id, end_id=Tokenizer.end_id)
# Small decoder sizes for every test that is not about the exact architecture.
SMALL = dict(embedding_dim=16, units=32)


@pytest.fixture(scope="module")
def model() -> ShowAttendTell:
    """The paper's sizes (embedding 256, units 512), built, untrained."""
    keras.utils.set_random_seed(0)
    return ShowAttendTell(V).build_all()


def _features(seed: int = 0, n: int = B) -> np.ndarray:
    """Raw-looking backbone features: non-negative, like InceptionV3's ReLU outputs."""
    return np.random.default_rng(seed).random((n, 64, 2048), dtype=np.float32)


def _standardised(seed: int, n: int) -> np.ndarray:
    """Zero-mean, unit-variance features (what model.feature_norm=channel feeds the decoder)."""
    return np.random.default_rng(seed).standard_normal((n, 64, 2048), dtype=np.float32)


def _train(model: ShowAttendTell, features: np.ndarray, captions: np.ndarray, steps: int, lr: float) -> list[float]:
    """Adam through production's compiled step (`make_train_step`, one replica); returns the
    per-token masked loss before each step."""
    opt = make_optimizer(lr)
    f, c = tf.constant(features), tf.constant(captions)
    step = make_train_step(model, opt, tf.distribute.get_strategy(), len(captions))
    losses = []
    for _ in range(steps):
        total, tokens = step(f, c)
        losses.append(float(total) / float(tokens))
    return losses


# --- architecture -----------------------------------------------------------------------------


def test_layer_shapes_are_the_papers(model: ShowAttendTell) -> None:
    assert tuple(model.encoder.kernel.shape) == (2048, 256)  # Dense(256, relu) on 2048 channels
    assert model.encoder.activation is keras.activations.relu
    assert tuple(model.attention.W1.kernel.shape) == (256, 512)  # on the encoded features
    assert tuple(model.attention.W2.kernel.shape) == (512, 512)  # on the GRU state (units)
    assert tuple(model.attention.V.kernel.shape) == (512, 1)
    assert tuple(model.embedding.embeddings.shape) == (V, 256)
    assert model.gru.units == 512
    assert tuple(model.gru.kernel.shape) == (512, 3 * 512)  # input: context 256 + embedding 256
    assert tuple(model.gru.recurrent_kernel.shape) == (512, 3 * 512)
    assert tuple(model.fc1.kernel.shape) == (512, 512)
    assert tuple(model.fc2.kernel.shape) == (512, V)
    assert tuple(model.feature_mean.shape) == tuple(model.feature_std.shape) == (2048,)
    assert not model.feature_mean.trainable and not model.feature_std.trainable
    # Nothing else is trainable: the parameter count is exactly these layers'.
    expected = (
        2048 * 256
        + 256  # encoder
        + 256 * 512
        + 512
        + 512 * 512
        + 512
        + 512
        + 1  # W1, W2, V
        + V * 256  # embedding
        + 2 * 512 * 1536
        + 2 * 1536  # GRU kernels and (reset_after) biases
        + 512 * 512
        + 512
        + 512 * V
        + V  # fc1, fc2
    )
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == expected


def test_bahdanau_attention_is_a_softmax_weighted_sum_of_the_features() -> None:
    keras.utils.set_random_seed(1)
    attention = BahdanauAttention(8)
    features = tf.constant(np.random.default_rng(1).normal(size=(2, 64, 5)), tf.float32)
    hidden = tf.constant(np.random.default_rng(2).normal(size=(2, 8)), tf.float32)
    context, weights = attention(features, attention.project(features), hidden)
    assert context.shape == (2, 5) and weights.shape == (2, 64)
    assert (weights.numpy() >= 0).all()
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        context.numpy(), np.einsum("bl,bld->bd", weights.numpy(), features.numpy()), rtol=1e-5, atol=1e-6
    )
    score = np.tanh(attention.W1(features).numpy() + attention.W2(hidden).numpy()[:, None, :])
    logits = attention.V(score).numpy()[..., 0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(weights.numpy(), expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


# --- shapes -----------------------------------------------------------------------------------


def test_teacher_forcing_output_shapes(model: ShowAttendTell) -> None:
    captions = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 4, 4, 4, 3]], np.int32)
    logits, attention = model(_features(), captions)
    assert logits.shape == (B, 4, V) and logits.dtype == tf.float32
    assert attention.shape == (B, 4, 64)
    assert (attention.numpy() >= 0).all()
    np.testing.assert_allclose(tf.reduce_sum(attention, -1).numpy(), 1.0, rtol=1e-5)
    # Any caption length works with the same model (T = 2 and T = 9).
    assert model(_features(n=1), np.array([[2, 3]], np.int32))[0].shape == (1, 1, V)
    assert model(_features(n=2), np.zeros((2, 9), np.int32))[1].shape == (2, 8, 64)


def test_greedy_output_shapes_and_dtypes(model: ShowAttendTell) -> None:
    tokens, attention, log_prob, lengths = model.greedy(_features(), max_steps=5, **IDS)
    assert tokens.shape == (B, 5) and tokens.dtype == tf.int32
    assert attention.shape == (B, 5, 64) and attention.dtype == tf.float32
    assert log_prob.shape == (B,) and lengths.shape == (B,)
    assert lengths.dtype == tf.int32
    assert (log_prob.numpy() <= 0).all() and np.isfinite(log_prob.numpy()).all()


# --- loss and the padding mask ----------------------------------------------------------------


def test_caption_loss_counts_real_targets_only() -> None:
    captions = np.array([[2, 5, 3, 0, 0], [2, 3, 0, 0, 0]], np.int32)  # 2 + 1 real targets
    uniform = tf.zeros((2, 4, V))
    total, count = caption_loss(captions, uniform)
    assert float(count) == 3.0
    assert float(total) == pytest.approx(3 * np.log(V), rel=1e-6)
    # Garbage logits on padded positions change nothing.
    noisy = uniform.numpy()
    noisy[0, 2:] = noisy[1, 1:] = 50.0 * np.random.default_rng(0).normal(size=V)
    assert float(caption_loss(captions, noisy)[0]) == pytest.approx(float(total), rel=1e-6)


def test_extra_padding_does_not_change_the_loss(model: ShowAttendTell) -> None:
    captions = np.array([[2, 5, 6, 3], [2, 7, 3, 0], [2, 4, 3, 0]], np.int32)
    features = _features()
    logits, _ = model(features, captions)
    loss, count = caption_loss(captions, logits)
    assert float(count) == 3 + 2 + 2
    for extra in (1, 5):
        padded = np.pad(captions, [(0, 0), (0, extra)])
        logits_p, _ = model(features, padded)
        assert logits_p.shape == (B, 3 + extra, V)
        # Left to right: outputs for real positions do not depend on the padding after them.
        np.testing.assert_allclose(logits_p.numpy()[:, :3], logits.numpy(), rtol=1e-5, atol=1e-5)
        loss_p, count_p = caption_loss(padded, logits_p)
        assert float(count_p) == float(count)
        assert abs(float(loss_p) - float(loss)) < 1e-4


def test_attention_penalty_counts_real_steps_only() -> None:
    captions = np.array([[2, 5, 6, 3, 0, 0]], np.int32)  # 3 real target steps, 2 padded
    uniform = np.full((1, 5, 64), 1 / 64, np.float32)
    expected = 64 * (1 - 3 / 64) ** 2
    assert float(attention_penalty(captions, uniform)) == pytest.approx(expected, rel=1e-5)
    # Each real step looking at its own cell: those 3 cells are covered exactly once.
    one_hot = np.zeros((1, 5, 64), np.float32)
    one_hot[0, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]] = 1
    assert float(attention_penalty(captions, one_hot)) == pytest.approx(61.0)


# --- greedy decoding --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_caption_model() -> tuple[ShowAttendTell, np.ndarray, list[float]]:
    """A tiny captioner trained until it maps 2 random feature arrays to 2 different captions."""
    features = _standardised(1, 2)
    captions = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]], np.int32)
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(8, **SMALL).build_all()
    losses = _train(model, features, captions, steps=40, lr=1e-2)
    return model, features, losses


def test_greedy_stops_at_end_after_training(two_caption_model) -> None:
    model, features, losses = two_caption_model
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    compiled = tf.function(lambda f: model.greedy(f, 10, **IDS))
    tokens, attention, log_prob, lengths = (t.numpy() for t in compiled(features))
    assert tokens.tolist() == [[5, 6, 3] + [0] * 7, [7, 3] + [0] * 8]
    assert lengths.tolist() == [3, 2]  # including <end>
    assert attention.shape == (2, 10, 64)
    np.testing.assert_allclose(attention[0, :3].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(attention[1, :2].sum(-1), 1.0, rtol=1e-5)
    assert not attention[0, 3:].any() and not attention[1, 2:].any()  # nothing after <end>
    assert (log_prob <= 0).all() and (log_prob > -0.5).all()  # confident, after training
    # Eager decoding gives the same answer as the compiled one.
    eager = model.greedy(features, 10, **IDS)
    np.testing.assert_array_equal(eager[0].numpy(), tokens)
    np.testing.assert_array_equal(eager[3].numpy(), lengths)


def test_greedy_stops_at_max_steps_when_no_end_is_emitted() -> None:
    keras.utils.set_random_seed(3)
    model = ShowAttendTell(V, **SMALL).build_all()
    features = _features(2)
    tokens, _, _, lengths = (t.numpy() for t in model.greedy(features, max_steps=4, **IDS))
    assert tokens.shape == (B, 4) and (lengths <= 4).all() and (lengths >= 1).all()
    for row, n in zip(tokens, lengths):  # lengths agree with the tokens, zeros after <end>
        assert not row[n:].any()
        assert (row[n - 1] == 3) == (n < 4 or row[3] == 3)
    # Forbid <end>: every caption runs to max_steps.
    bias = model.fc2.bias.numpy()
    bias[3] = -1e4
    model.fc2.bias.assign(bias)
    tokens, attention, log_prob, lengths = (t.numpy() for t in model.greedy(features, max_steps=4, **IDS))
    assert lengths.tolist() == [4, 4, 4] and not (tokens == 3).any()
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    # Greedy = argmax of teacher forcing on its own output, and log_prob is those tokens' sum.
    prefix = np.concatenate([np.full((B, 1), 2, np.int32), tokens], axis=1)
    logp = tf.nn.log_softmax(model(features, prefix)[0]).numpy()  # (B, 4, V)
    np.testing.assert_array_equal(logp.argmax(-1), tokens)
    chosen = np.take_along_axis(logp, tokens[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(log_prob, chosen, rtol=1e-4, atol=1e-4)
    # Force <end> first: one step each, the rest zero-filled.
    bias[3] = 1e4
    model.fc2.bias.assign(bias)
    tokens, attention, log_prob, lengths = (t.numpy() for t in model.greedy(features, max_steps=4, **IDS))
    assert tokens.tolist() == [[3, 0, 0, 0]] * B and lengths.tolist() == [1] * B
    assert not attention[:, 1:].any()


# --- learning ---------------------------------------------------------------------------------


def test_masked_loss_halves_within_30_steps() -> None:
    rng = np.random.default_rng(5)
    features = _standardised(5, 6)
    captions = np.zeros((6, 7), np.int32)
    for i, n in enumerate([2, 3, 4, 5, 3, 4]):  # random words 4..9, then <end>, then padding
        captions[i, : n + 2] = [2, *rng.integers(4, 10, n), 3]
    keras.utils.set_random_seed(5)
    model = ShowAttendTell(10, **SMALL).build_all()
    losses = _train(model, features, captions, steps=31, lr=1e-2)
    assert losses[0] == pytest.approx(np.log(10), rel=0.2)  # about uniform at the start
    assert losses[30] < 0.5 * losses[0], (losses[0], losses[30])


def test_make_optimizer_constant_and_cosine() -> None:
    constant = make_optimizer(1e-3)
    assert isinstance(constant, keras.optimizers.Adam)
    assert float(constant.learning_rate) == pytest.approx(1e-3)
    cosine = make_optimizer(1e-3, "cosine", total_steps=10)
    assert isinstance(cosine, keras.optimizers.Adam)
    assert float(cosine.learning_rate) == pytest.approx(1e-3)  # step 0
    cosine.iterations.assign(5)
    assert float(cosine.learning_rate) == pytest.approx(0.5e-3, rel=1e-4)
    cosine.iterations.assign(10)
    assert float(cosine.learning_rate) == pytest.approx(0.0, abs=1e-9)


# --- feature statistics and the weight round trip ---------------------------------------------


def test_feature_stats_normalise_the_encoding_and_survive_save_and_load(tmp_path: Path) -> None:
    keras.utils.set_random_seed(7)
    model = ShowAttendTell(V, **SMALL).build_all()
    features = _features(3)
    captions = np.array([[2, 5, 6, 3], [2, 7, 3, 0], [2, 4, 3, 0]], np.int32)
    plain, _ = model.encode(features)
    np.testing.assert_allclose(plain.numpy(), model.encoder(features).numpy(), rtol=1e-6)  # identity stats

    rng = np.random.default_rng(4)
    mean = rng.random(2048).astype(np.float32)
    std = (0.1 + rng.random(2048)).astype(np.float32)
    std[:3] = 0.0  # constant channels: floored, no division by zero
    model.set_feature_stats(mean, std)
    np.testing.assert_array_equal(model.feature_mean.numpy(), mean)
    assert model.feature_std.numpy()[:3].tolist() == pytest.approx([1e-6] * 3)
    normed, projected = model.encode(features)
    assert not np.allclose(normed.numpy(), plain.numpy())
    expected = model.encoder((features - mean) / model.feature_std.numpy()).numpy()
    np.testing.assert_allclose(normed.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(projected.numpy(), model.attention.W1(normed).numpy(), rtol=1e-5, atol=1e-5)

    logits = model(features, captions)[0].numpy()
    tokens = model.greedy(features, 6, **IDS)[0].numpy()
    path = tmp_path / "x.weights.h5"
    model.save_weights(path)
    keras.utils.set_random_seed(8)
    again = ShowAttendTell(V, **SMALL).build_all()
    assert not np.allclose(again(features, captions)[0].numpy(), logits)  # a different model before loading
    again.load_weights(path)
    np.testing.assert_array_equal(again.feature_mean.numpy(), model.feature_mean.numpy())
    np.testing.assert_array_equal(again.feature_std.numpy(), model.feature_std.numpy())
    np.testing.assert_allclose(again(features, captions)[0].numpy(), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(again.greedy(features, 6, **IDS)[0].numpy(), tokens)


# --- backbone (InceptionV3) -------------------------------------------------------------------


def test_random_backbone_is_seeded_and_has_the_8x8x2048_grid() -> None:
    a = build_backbone("random", seed=0)
    b = build_backbone("random", seed=0)
    assert a.output_shape == b.output_shape == (None, 8, 8, 2048)
    assert a.input_shape == (None, 299, 299, 3)
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb) > 100
    for i in (0, 1, len(wa) // 2, -2, -1):
        np.testing.assert_array_equal(wa[i], wb[i])
    assert wa[0].std() > 0  # really initialised, not zeros


@pytest.mark.parametrize(
    "weights, message",
    [("nonsense", "random"), ("nonsense", "imagenet"), ("{tmp}/missing.h5", "not found")],
)
def test_bad_backbone_weights_are_an_error(weights: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=message):
        build_backbone(weights.format(tmp=tmp_path))


def test_backbone_is_the_preprocessed_inception_reshaped_to_64_cells() -> None:
    backbone = Backbone("random", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    features = backbone(images)
    assert features.shape == (2, 64, 2048) and features.dtype == np.float32
    direct = backbone.inception(
        keras.applications.inception_v3.preprocess_input(images.astype(np.float32)), training=False
    )
    assert tuple(direct.shape) == (2, 8, 8, 2048)
    expected = np.reshape(np.asarray(direct), (2, 64, 2048))
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    assert not np.allclose(features[0], features[1])  # different images, different features


def test_beam_search_of_one_is_greedy_and_wider_beams_score_higher() -> None:
    keras.utils.set_random_seed(1)
    model = ShowAttendTell(12, embedding_dim=16, units=32).build_all()
    rng = np.random.default_rng(0)
    for w in (model.fc2.kernel, model.embedding.embeddings):  # sharper, more varied predictions
        w.assign(rng.normal(size=w.shape).astype("float32"))
    feats = rng.normal(size=(4, 64, 2048)).astype("float32")
    greedy = [t.numpy() for t in model.greedy(feats, 6, **IDS)]
    beam1 = [t.numpy() for t in tf.function(lambda f: model.beam_search(f, 6, 1, 0.0, **IDS))(feats)]
    for g, b in zip(greedy, beam1):
        np.testing.assert_allclose(g, b, rtol=1e-5, atol=1e-6)
    # Compiled with a static batch size, as the caption job's tf.function sees it.
    static = tf.function(
        lambda f: model.beam_search(f, 6, 3, 0.0, **IDS), input_signature=[tf.TensorSpec((4, 64, 2048))]
    )
    tokens, attention, log_prob, lengths = (t.numpy() for t in static(feats))
    assert tokens.shape == (4, 6) and attention.shape == (4, 6, 64) and lengths.shape == (4,)
    assert (log_prob >= greedy[2] - 1e-5).all() and (log_prob > greedy[2] + 1e-3).any()
