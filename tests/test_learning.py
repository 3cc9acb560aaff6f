"""Learning test: the captioner learns synthetic scenes from random-InceptionV3 features."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from capray import synthetic
from capray.model import Backbone, ShowAttendTell, make_optimizer
from capray.text import Tokenizer
from capray.train.loop import make_train_step


def test_loss_falls_on_synthetic_scenes() -> None:
    scenes = [synthetic.render(seed=3, index=i) for i in range(48)]
    pixels = np.stack([np.asarray(img) for img, _ in scenes])
    feats = Backbone("random", seed=0)(pixels)
    tokenizer = Tokenizer.fit([c for _, c in scenes])
    captions = tokenizer.encode_batch([c for _, c in scenes])
    model = ShowAttendTell(tokenizer.vocab_size, 64, 128).build_all()
    model.set_feature_stats(feats.reshape(-1, 2048).mean(0), feats.reshape(-1, 2048).std(0))
    opt = make_optimizer(3e-3)
    # Production's step, as a training worker builds it (one replica here).
    step = make_train_step(model, opt, tf.distribute.get_strategy(), len(scenes))
    f, c = tf.constant(feats), tf.constant(captions)
    losses = []
    for _ in range(60):
        total, tokens = step(f, c)  # the loss before this step's update
        losses.append(float(total) / float(tokens))
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
