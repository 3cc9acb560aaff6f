"""Unit tests of the training step (capray.train.loop.make_train_step) under TensorFlow's default
strategy, no Ray: it learns, and gradient clipping acts on the whole gradient as computed by hand."""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

from capray.model import ShowAttendTell, caption_loss, make_optimizer
from capray.train.loop import make_eval_step, make_train_step

B, T, V = 4, 7, 11  # batch, padded caption length, vocabulary
RATE = 0.1


@pytest.fixture(autouse=True)
def float32_policy() -> Iterator[None]:
    """Exact comparisons need float32 layers, whatever policy an earlier test left behind."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    yield
    keras.mixed_precision.set_dtype_policy(before)


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """A fixed batch: features (B, 64, 2048) and captions (B, T) of <start> words <end> <pad>..."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((B, 64, 2048), dtype=np.float32)
    captions = np.zeros((B, T), np.int32)
    for i, length in enumerate((3, 4, 5, 2)):
        captions[i, 0], captions[i, 1 : 1 + length], captions[i, 1 + length] = 2, rng.integers(4, V, length), 3
    return features, captions


def _model() -> ShowAttendTell:
    keras.utils.set_random_seed(0)
    return ShowAttendTell(V, embedding_dim=8, units=16).build_all()


def _signature() -> tuple[tf.TensorSpec, tf.TensorSpec]:
    return tf.TensorSpec((B, 64, 2048), tf.float32), tf.TensorSpec((B, T), tf.int32)


def _gradients(model: ShowAttendTell, features: np.ndarray, captions: np.ndarray) -> list[tf.Tensor]:
    """Dense gradients of the step's loss (token losses summed, divided by the global batch)."""
    with tf.GradientTape() as tape:
        logits, _ = model(features, captions, training=True)
        loss = caption_loss(captions, logits)[0] / B
    return [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]


def _one_sgd_step(clip_norm: float) -> tuple[list[np.ndarray], list[np.ndarray], list[tf.Tensor]]:
    """Weights before and after one SGD step of `make_train_step`, and the gradients at the start."""
    features, captions = _batch()
    model = _model()
    optimizer = make_optimizer(RATE, kind="sgd")
    optimizer.build(model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, features, captions)
    step = make_train_step(
        model, optimizer, tf.distribute.get_strategy(), B, clip_norm=clip_norm, signature=_signature()
    )
    step(features, captions)
    return before, [v.numpy() for v in model.trainable_variables], grads


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


def test_loss_falls_over_a_few_steps_with_clipping_on() -> None:
    features, captions = _batch()
    model = _model()
    optimizer = make_optimizer(1e-2)
    optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, tf.distribute.get_strategy(), B, clip_norm=1.0, signature=_signature())
    losses = []
    for _ in range(8):
        loss_sum, tokens = step(features, captions)
        assert float(tokens) == float(np.sum(captions[:, 1:] != 0))
        losses.append(float(loss_sum) / float(tokens))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    # The eval step measures the same loss (no update): lower than before training.
    eval_sum, eval_tokens = make_eval_step(model)(features, captions)
    assert float(eval_sum) / float(eval_tokens) < losses[0]


def test_clipping_scales_the_whole_gradient_to_clip_norm() -> None:
    norm = float(tf.linalg.global_norm(_gradients(_model(), *_batch())))
    clip_norm = norm / 10  # binds: the update shrinks tenfold
    before, after, grads = _one_sgd_step(clip_norm)
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm)
    by_hand = [w - RATE * g.numpy() for w, g in zip(before, clipped)]
    unclipped = [w - RATE * g.numpy() for w, g in zip(before, grads)]
    assert _close(after, by_hand)
    assert not _close(after, unclipped)
    moved = np.sqrt(sum(np.sum((a - w) ** 2) for a, w in zip(after, before)))
    np.testing.assert_allclose(moved, RATE * clip_norm, rtol=1e-4)


def test_a_clip_norm_that_does_not_bind_leaves_the_step_unchanged() -> None:
    norm = float(tf.linalg.global_norm(_gradients(_model(), *_batch())))
    for clip_norm in (0.0, 10 * norm):  # off, and on but above the gradient's norm
        before, after, grads = _one_sgd_step(clip_norm)
        assert _close(after, [w - RATE * g.numpy() for w, g in zip(before, grads)]), clip_norm
