"""Benchmark: training throughput (captions/s) of capray's step vs the tutorial's loop, one run.

  capray    one compiled tf.function for the whole teacher-forced step (graph while_loop over
            time steps, W1·features and the output layers hoisted out of the loop)
  tutorial  the TF tutorial's loop: eager, a Python loop over time steps calling the decoder
            one step at a time under GradientTape, W1·features and fc1/fc2 recomputed per step

Same model weights' shapes, batch size, data and machine. Usage:
  python bench/train.py [--batch-size 64] [--length 20] [--vocab 5001] [--steps 20]
Data: random features (B, 64, 2048) and random captions of the given padded length/vocabulary
(COCO-like defaults: 20 tokens, 5,001-word vocabulary).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import capray  # noqa: F401  (sets the Keras backend)


def main() -> None:
    """Time both training steps on identical batches and print captions/s and the ratio."""
    import tensorflow as tf

    from capray.model import ShowAttendTell, make_optimizer
    from capray.train.loop import make_train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=5001)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.length
    feats = rng.random((B, 64, 2048), dtype=np.float32)
    caps = rng.integers(4, args.vocab, (B, T)).astype(np.int32)
    caps[:, 0] = 2
    caps[:, -1] = 3

    model = ShowAttendTell(args.vocab).build_all()
    opt = make_optimizer(1e-3)

    # Production's step (loss scaling and clipping paths included), as a training worker builds it.
    capray_step = make_train_step(model, opt, tf.distribute.get_strategy(), B)

    loss_object = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    # A deliberate reference, not production code: the tutorial's own eager loop, the baseline.
    def tutorial_step(f: np.ndarray, c: np.ndarray) -> tf.Tensor:
        loss = 0.0
        hidden = tf.zeros((B, model.units))
        dec_input = tf.expand_dims(c[:, 0], 1)
        with tf.GradientTape() as tape:
            encoded = model.encoder(f)
            for i in range(1, T):
                # The tutorial's decoder call: attention (with W1·features), GRU, fc1, fc2.
                context, _ = model.attention(encoded, model.attention.W1(encoded), hidden)
                x = tf.concat([context, model.embedding(dec_input[:, 0])], axis=-1)
                output, state = model.gru(x, [hidden])
                hidden = state[0]
                predictions = model.fc2(model.fc1(output))
                mask = tf.cast(c[:, i] != 0, tf.float32)
                loss += tf.reduce_mean(loss_object(c[:, i], predictions) * mask)
                dec_input = tf.expand_dims(c[:, i], 1)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss / T

    results = {}
    for name, step in (("capray", capray_step), ("tutorial", tutorial_step)):
        step(feats, caps)  # warm-up (tracing for the compiled step)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(feats, caps)
        results[name] = args.steps * B / (time.perf_counter() - start)
    print(f"batch {B}, caption length {T}, vocabulary {args.vocab}, {args.steps} timed steps each")
    print(f"capray compiled step   {results['capray']:8.1f} captions/s")
    print(f"tutorial eager loop    {results['tutorial']:8.1f} captions/s")
    print(f"ratio {results['capray'] / results['tutorial']:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
