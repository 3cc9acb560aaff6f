"""Show, Attend and Tell (soft attention) in plain Keras 3: no Ray in this file.

Shapes: B = batch, L = 64 attention cells (8x8 InceptionV3 grid), D = 2048 feature channels,
E = embedding_dim (256), U = units (512), V = vocabulary size, T = padded caption length.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, TypeAlias

import numpy as np

from capray.tfquiet import import_tensorflow

# Every TensorFlow import of capray goes through here (Keras below imports it too), so job logs
# are free of its CUDA/oneDNN start-up banners: import capray.model instead of tensorflow.
tf = import_tensorflow()
# For annotations: TensorFlow ships no type information, so a tensor is Any to the type checker.
Tensor: TypeAlias = Any
import keras  # noqa: E402

from capray import backbone  # noqa: E402 (after TensorFlow's quiet import above)
from capray.backbone import BackboneError  # noqa: E402 (as above)
from capray.images import FEATURE_DIM, IMAGE_SIZE, NUM_CELLS  # noqa: E402 (as above)


def set_precision(precision: str) -> None:
    """Set Keras' global dtype policy (`model.precision`): float32, mixed_float16 or mixed_bfloat16.

    Global, so it is set where a process starts its work (Ray actor, training worker) and before
    any layer is built; layers keep the policy they were built under.
    """
    if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
        raise ValueError(f"model.precision={precision!r}: expected float32, mixed_float16 or mixed_bfloat16")
    keras.mixed_precision.set_dtype_policy(precision)


def gpu_memory_growth() -> int:
    """Make TensorFlow take GPU memory as it needs it in this process; returns the GPUs it sees.

    By default each TensorFlow process maps nearly all of every visible GPU's memory at its
    first op, so a second actor on a shared GPU (extract.num_gpus=0.5) would fail to allocate.
    Called where an actor or training worker starts, before any op; Ray workers also get
    TF_FORCE_GPU_ALLOW_GROWTH=true (capray.runtime) for TensorFlow started before this.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is initialised already: the environment variable applied
            pass
    return len(gpus)


def build_backbone(weights: str = "imagenet", seed: int = 0, storage: Any = None) -> keras.Model:
    """InceptionV3 without its classifier: (B, 299, 299, 3) preprocessed -> (B, 8, 8, 2048)."""
    kwargs = dict(include_top=False, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    if weights == "random":
        # Every process that builds a random backbone with this seed gets the same weights, so
        # features extracted in one job match the encoder the caption job rebuilds elsewhere.
        keras.utils.set_random_seed(seed)
        return keras.applications.InceptionV3(weights=None, **kwargs)
    # imagenet: the file the driver's check left in the Keras cache (no second download).
    source = backbone.check(weights, storage)
    assert source is not None  # only `random` has no file, returned above
    from capray import storage as st  # local import: storage pulls in pyarrow only when needed

    with tempfile.TemporaryDirectory() as tmp:
        local = source
        if st.is_remote(source):
            local = os.path.join(tmp, os.path.basename(source))
            with open(local, "wb") as f:
                f.write(st.read_bytes(source, storage))
        try:
            return keras.applications.InceptionV3(weights=local, **kwargs)
        except Exception as e:  # noqa: BLE001 (not an HDF5 file, or weights of another architecture)
            raise BackboneError(
                f"backbone.weights={weights}: cannot load {source} as InceptionV3 no-top weights: "
                f"{type(e).__name__}: {' '.join(str(e).split())}"
            ) from None


class Backbone:
    """InceptionV3 feature extractor: uint8 RGB images -> (B, 64, 2048) features of `dtype`."""

    def __init__(
        self,
        weights: str = "imagenet",
        seed: int = 0,
        storage: Any = None,
        jit_compile: bool = False,
        dtype: str = "float32",
    ):
        self.inception = build_backbone(weights, seed, storage)
        # The cast to the stored dtype runs in the graph: a float16 result leaves the device at
        # half the bytes, and no NumPy pass over the batch follows (bench/extract.py).
        self.dtype = tf.as_dtype(dtype)
        # Traced once for any batch size: a job's last, partial batch (or a batch short of its
        # unreadable images) would otherwise trace the whole backbone again (~1 s on CPU).
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)
        self._forward = tf.function(self._features, input_signature=[spec], jit_compile=jit_compile)

    def _features(self, images: Tensor) -> Tensor:
        x = keras.applications.inception_v3.preprocess_input(tf.cast(images, tf.float32))
        grid = self.inception(x, training=False)  # (B, 8, 8, 2048); 16-bit under mixed precision
        return tf.reshape(tf.cast(grid, self.dtype), (-1, NUM_CELLS, FEATURE_DIM))  # (B, 64, 2048)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch of (B, 299, 299, 3) uint8 images."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"Backbone takes uint8 pixels (capray.images.decode), got {images.dtype}")
        return self._forward(tf.convert_to_tensor(images)).numpy()


class BahdanauAttention(keras.layers.Layer):
    """Additive attention: score = V(tanh(W1 f + W2 h)), softmax over the 64 cells."""

    def __init__(self, units: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.W1 = keras.layers.Dense(units, name="W1")
        self.W2 = keras.layers.Dense(units, name="W2")
        self.V = keras.layers.Dense(1, name="V")

    def project(self, features: Tensor) -> Tensor:
        """W1 f, which does not depend on the step: computed once per caption, not per word."""
        return self.W1(features)  # (B, 64, U)

    def call(self, features: Tensor, projected: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        score = tf.tanh(projected + self.W2(hidden)[:, None, :])  # (B, 64, U)
        # Softmax in float32 (a no-op cast unless mixed precision computes the scores in 16 bits).
        weights = tf.nn.softmax(tf.cast(self.V(score)[..., 0], tf.float32), axis=1)  # (B, 64)
        context = tf.reduce_sum(tf.cast(weights, features.dtype)[..., None] * features, axis=1)  # (B, E)
        return context, weights


class ShowAttendTell(keras.Model):
    """Encoder Dense(E, relu) + Bahdanau attention + GRU(U) decoder with Dense(U), Dense(V) heads."""

    def __init__(self, vocab_size: int, embedding_dim: int = 256, units: int = 512, **kwargs: Any):
        super().__init__(**kwargs)
        self.vocab_size, self.units = vocab_size, units
        # Per-channel standardisation of the backbone features; identity unless set from the
        # training features (model.feature_norm=channel). Stored with the weights.
        self.feature_mean = self.add_weight(
            shape=(FEATURE_DIM,), initializer="zeros", trainable=False, name="feature_mean"
        )
        self.feature_std = self.add_weight(
            shape=(FEATURE_DIM,), initializer="ones", trainable=False, name="feature_std"
        )
        self.encoder = keras.layers.Dense(embedding_dim, activation="relu", name="encoder")
        self.attention = BahdanauAttention(units, name="attention")
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.gru = keras.layers.GRUCell(units, recurrent_initializer="glorot_uniform", name="gru")
        self.fc1 = keras.layers.Dense(units, name="fc1")
        self.fc2 = keras.layers.Dense(vocab_size, name="fc2")

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Install per-channel feature statistics (2048,) used to standardise inputs."""
        self.feature_mean.assign(np.asarray(mean, np.float32))
        self.feature_std.assign(np.maximum(np.asarray(std, np.float32), 1e-6))

    def encode(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features (B, 64, 2048) -> encoded (B, 64, E) and attention projection (B, 64, U)."""
        x = (tf.cast(features, tf.float32) - self.feature_mean) / self.feature_std
        encoded = self.encoder(x)  # (B, 64, E)
        return encoded, self.attention.project(encoded)

    def step(self, token: Tensor, encoded: Tensor, projected: Tensor, hidden: Tensor):
        """One decoder step: previous word (B,) and state (B, U) -> GRU output (B, U), state, attention (B, 64)."""
        context, alpha = self.attention(encoded, projected, hidden)  # (B, E), (B, 64)
        x = tf.concat([context, self.embedding(token)], axis=-1)  # (B, 2E)
        # The TF tutorial resets its GRU every step (no initial_state); we carry the state, as
        # the paper's LSTM does.
        output, state = self.gru(x, [hidden])
        # The loops carry float32 (16-bit outputs under mixed precision would not match their state).
        return tf.cast(output, tf.float32), tf.cast(state[0], tf.float32), alpha

    def head(self, outputs: Tensor) -> Tensor:
        """GRU outputs (..., U) -> vocabulary logits (..., V), float32 (softmax and loss stay float32)."""
        return tf.cast(self.fc2(self.fc1(outputs)), tf.float32)

    def call(self, features: Tensor, captions: Tensor, training: bool = False):
        """Teacher forcing: logits (B, T-1, V) predicting captions[:, 1:] and attention (B, T-1, 64)."""
        encoded, projected = self.encode(features)
        batch = tf.shape(captions)[0]
        steps = tf.shape(captions)[1] - 1
        inputs = tf.transpose(captions[:, :-1])  # (T-1, B): word t is fed to predict word t+1
        outs = tf.TensorArray(tf.float32, size=steps)
        alphas = tf.TensorArray(tf.float32, size=steps)

        # Explicit while_loop: Keras 3 runs `call` without AutoGraph, and a graph loop keeps the
        # traced step the same size for any caption length.
        def body(t, hidden, outs, alphas):
            output, hidden, alpha = self.step(inputs[t], encoded, projected, hidden)
            return t + 1, hidden, outs.write(t, output), alphas.write(t, alpha)

        # maximum_iterations: XLA (model.jit_compile) needs the loop's bound to size its gradient.
        _, _, outs, alphas = tf.while_loop(
            lambda t, *_: t < steps,
            body,
            (tf.constant(0), tf.zeros((batch, self.units)), outs, alphas),
            maximum_iterations=steps,
        )
        outputs = tf.transpose(outs.stack(), [1, 0, 2])  # (B, T-1, U)
        # fc1/fc2 do not feed back into the recurrence, so they run once on all steps.
        return self.head(outputs), tf.transpose(alphas.stack(), [1, 0, 2])  # (B, T-1, V), (B, T-1, 64)

    def build_all(self, max_length: int = 3) -> ShowAttendTell:
        """Create every weight (Keras builds lazily) so weights can be saved, loaded or mirrored."""
        self(tf.zeros((1, NUM_CELLS, FEATURE_DIM)), tf.zeros((1, max_length), tf.int32))
        return self

    def greedy(self, features: Tensor, max_steps: int, *, start_id: int, end_id: int):
        """Batched greedy decoding until every caption has emitted `<end>` or max_steps words
        (`start_id`, `end_id`: the tokenizer's; capray.decoder.Decoder passes them).

        Returns tokens (B, max_steps) int32 (0 after `<end>`), attention (B, max_steps, 64),
        log-probability (B,) of the emitted tokens and lengths (B,) including `<end>`.
        """
        encoded, projected = self.encode(features)
        batch = tf.shape(features)[0]
        token = tf.fill((batch,), start_id)
        hidden = tf.zeros((batch, self.units))
        done = tf.zeros((batch,), tf.bool)
        log_prob = tf.zeros((batch,))
        lengths = tf.zeros((batch,), tf.int32)
        tokens = tf.TensorArray(tf.int32, size=max_steps, element_shape=(None,))
        alphas = tf.TensorArray(tf.float32, size=max_steps, element_shape=(None, NUM_CELLS))

        def body(t, token, hidden, done, log_prob, lengths, tokens, alphas):
            output, hidden, alpha = self.step(token, encoded, projected, hidden)
            logp = tf.nn.log_softmax(self.head(output))  # (B, V)
            token = tf.argmax(logp, axis=-1, output_type=tf.int32)  # (B,)
            live = tf.logical_not(done)
            log_prob += tf.where(live, tf.gather(logp, token, batch_dims=1), 0.0)
            lengths += tf.cast(live, tf.int32)
            tokens = tokens.write(t, tf.where(live, token, 0))
            alphas = alphas.write(t, tf.where(live[:, None], alpha, 0.0))
            return t + 1, token, hidden, tf.logical_or(done, token == end_id), log_prob, lengths, tokens, alphas

        def cond(t, token, hidden, done, *_):
            return tf.logical_and(t < max_steps, tf.logical_not(tf.reduce_all(done)))

        t, _, _, _, log_prob, lengths, tokens, alphas = tf.while_loop(
            cond, body, (tf.constant(0), token, hidden, done, log_prob, lengths, tokens, alphas)
        )
        # Steps not taken (everyone finished early) are zero-filled to a fixed width.
        pad = max_steps - t
        tok = tf.pad(tf.transpose(tokens.stack()[:t]), [[0, 0], [0, pad]])  # (B, max_steps)
        att = tf.pad(tf.transpose(alphas.stack()[:t], [1, 0, 2]), [[0, 0], [0, pad], [0, 0]])  # (B, max_steps, 64)
        return tok, att, log_prob, lengths

    def beam_search(
        self,
        features: Tensor,
        max_steps: int,
        beam_size: int,
        length_alpha: float,
        *,
        start_id: int,
        end_id: int,
    ):
        """Batched beam search; the same outputs as `greedy`, for the best beam of each image.

        Beams are ranked at the end by log-probability / length**length_alpha (length
        normalisation: 0 = raw log-probability, which favours short captions).
        """
        k, steps = beam_size, max_steps
        encoded, projected = self.encode(features)
        batch = tf.shape(features)[0]
        n = batch * k
        encoded = tf.repeat(encoded, k, axis=0)  # (B*K, 64, E)
        projected = tf.repeat(projected, k, axis=0)  # (B*K, 64, U)
        # Only the first beam of each image is live at the start, so the K first words differ.
        scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], -1e9)], 0), [batch])  # (B*K,)
        token = tf.fill((n,), start_id)
        hidden = tf.zeros((n, self.units))
        done = tf.zeros((n,), tf.bool)
        lengths = tf.zeros((n,), tf.int32)
        history = tf.zeros((n, steps), tf.int32)
        attention = tf.zeros((n, steps, NUM_CELLS))
        columns = tf.range(steps)
        vocab = self.vocab_size
        # A finished beam may only "emit" <pad> at no cost, keeping its score.
        finished_row = tf.where(tf.range(vocab) == 0, 0.0, -1e9)  # (V,)

        def body(t, token, hidden, done, scores, lengths, history, attention):
            output, hidden, alpha = self.step(token, encoded, projected, hidden)
            logp = tf.nn.log_softmax(self.head(output))  # (B*K, V)
            logp = tf.where(done[:, None], finished_row[None, :], logp)
            total = tf.reshape(scores[:, None] + logp, (batch, k * vocab))  # (B, K*V)
            best, index = tf.math.top_k(total, k)  # (B, K)
            parent = tf.reshape(index // vocab + tf.range(batch)[:, None] * k, (-1,))  # (B*K,)
            token = tf.reshape(index % vocab, (-1,))
            was_done = tf.gather(done, parent)
            hidden = tf.gather(hidden, parent)
            lengths = tf.gather(lengths, parent) + tf.cast(tf.logical_not(was_done), tf.int32)
            here = columns[None, :] == t
            history = tf.where(here, token[:, None], tf.gather(history, parent))
            alpha = tf.where(was_done[:, None], 0.0, tf.gather(alpha, parent))
            attention = tf.where(here[..., None], alpha[:, None, :], tf.gather(attention, parent))
            done = tf.logical_or(was_done, token == end_id)
            return t + 1, token, hidden, done, tf.reshape(best, (-1,)), lengths, history, attention

        def cond(t, token, hidden, done, *_):
            return tf.logical_and(t < steps, tf.logical_not(tf.reduce_all(done)))

        # The beam gathers lose the static batch size; say so rather than fail when it is known.
        invariants = (
            tf.TensorShape([]),
            tf.TensorShape([None]),
            tf.TensorShape([None, self.units]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None, steps]),
            tf.TensorShape([None, steps, NUM_CELLS]),
        )
        _, _, _, _, scores, lengths, history, attention = tf.while_loop(
            cond,
            body,
            (tf.constant(0), token, hidden, done, scores, lengths, history, attention),
            shape_invariants=invariants,
        )
        norm = scores / tf.pow(tf.cast(tf.maximum(lengths, 1), tf.float32), length_alpha)
        pick = tf.argmax(tf.reshape(norm, (batch, k)), axis=1, output_type=tf.int32) + tf.range(batch) * k  # (B,)
        return (
            tf.gather(history, pick),  # (B, max_steps)
            tf.gather(attention, pick),  # (B, max_steps, 64)
            tf.gather(scores, pick),  # (B,)
            tf.gather(lengths, pick),  # (B,)
        )


def caption_loss(captions: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Masked sparse softmax cross-entropy: (sum over real tokens, number of real tokens).

    Targets are captions[:, 1:]; `<pad>` (0) targets contribute nothing, so extra padding never
    changes the loss. Callers divide the sum by the (global) batch size.
    """
    targets = captions[:, 1:]
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)  # (B, T-1)
    mask = tf.cast(targets != 0, ce.dtype)
    return tf.reduce_sum(ce * mask), tf.reduce_sum(mask)


def attention_penalty(captions: Tensor, attention: Tensor) -> Tensor:
    """Xu et al.'s doubly stochastic regulariser, summed over the batch: sum_i (1 - sum_t alpha_ti)^2.

    It pushes the model to look at every cell over the course of a caption; only real (non-pad)
    steps count. The caller multiplies by lambda (`train.attention_reg`) and divides by the batch.
    """
    mask = tf.cast(captions[:, 1:] != 0, attention.dtype)[..., None]  # (B, T-1, 1)
    coverage = tf.reduce_sum(attention * mask, axis=1)  # (B, 64)
    return tf.reduce_sum(tf.square(1.0 - coverage))


def make_optimizer(
    learning_rate: float,
    schedule: str = "constant",
    total_steps: int = 0,
    loss_scale: bool = False,
    kind: str = "adam",
) -> keras.optimizers.Optimizer:
    """Adam (the seed's) or plain SGD; optionally with the learning rate cosine-decayed over `total_steps`.

    With `loss_scale` (mixed_float16), wrapped in a dynamic LossScaleOptimizer: the caller scales
    the loss with `optimizer.scale_loss` and the optimizer unscales, skipping steps with inf/NaN
    gradients. bfloat16 has float32's exponent range and needs no scaling.
    """
    rate = (
        keras.optimizers.schedules.CosineDecay(learning_rate, max(total_steps, 1))
        if schedule == "cosine"
        else learning_rate
    )
    if kind == "adam":
        optimizer = keras.optimizers.Adam(rate)
    elif kind == "sgd":
        optimizer = keras.optimizers.SGD(rate)
    else:
        raise ValueError(f"optimizer {kind!r}: expected adam or sgd")
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer
