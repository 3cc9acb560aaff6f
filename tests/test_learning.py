"""Learning test: the captioner learns synthetic scenes from random-InceptionV3 features."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from capray import synthetic
from capray.model import Backbone, ShowAttendTell, caption_loss, make_optimizer
from capray.text import Tokenizer


def test_loss_falls_on_synthetic_scenes() -> None:
    scenes = [synthetic.render(seed=3, index=i) for i in range(48)]
    pixels = np.stack([np.asarray(img) for img, _ in scenes])
    feats = Backbone("random", seed=0)(pixels)
    tokenizer = Tokenizer.fit([c for _, c in scenes])
    captions = tokenizer.encode_batch([c for _, c in scenes])
    model = ShowAttendTell(tokenizer.vocab_size, 64, 128).build_all()
    model.set_feature_stats(feats.reshape(-1, 2048).mean(0), feats.reshape(-1, 2048).std(0))
    opt = make_optimizer(3e-3)

    @tf.function
    def step(f: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits, _ = model(f, c, training=True)
            total, tokens = caption_loss(c, logits)
            loss = total / tokens
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    losses = [float(step(feats, captions)) for _ in range(60)]
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
