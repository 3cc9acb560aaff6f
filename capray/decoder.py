"""Features -> captions: the one decoder behind the caption job, evaluation and the Python API.

A `Decoder` compiles a checkpoint's greedy or beam search once (one trace for every batch size)
and turns its token ids back into words with the tokenizer that trained the model, keeping each
emitted token's 64 attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from capray.model import FEATURE_DIM, NUM_CELLS, ShowAttendTell  # first: it imports TensorFlow quietly
from capray.text import Tokenizer

if TYPE_CHECKING:
    pass

STRATEGIES = ("greedy", "beam")


@dataclass
class Caption:
    """A decoded caption: its text and words, each word's 64 attention weights (words, 64), the
    log-probability of the emitted tokens and their count (`<end>` included), and the attention of
    every emitted token (num_tokens, 64), `<end>`'s too; or, for an image that could not be read,
    empty with `error` set."""

    text: str
    words: list[str]
    attention: np.ndarray
    log_prob: float = 0.0
    num_tokens: int = 0
    token_attention: np.ndarray | None = None
    # Why the image has no caption (`Captioner.caption(..., on_error="keep")`); None: captioned.
    error: str | None = None


class Decoder:
    """Compiled greedy or beam-search decoding of a model on backbone features."""

    def __init__(
        self,
        model: ShowAttendTell,
        tokenizer: Tokenizer,
        strategy: str,
        max_length: int,
        beam_size: int,
        length_alpha: float,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        self.tokenizer = tokenizer
        steps = (max_length or tokenizer.max_length) - 1
        ids = dict(start_id=tokenizer.start_id, end_id=tokenizer.end_id)
        if strategy == "beam":
            # The label of the caption job's `strategy` column and of evaluation tables.
            self.label = f"beam{beam_size}"
            fn = lambda f: model.beam_search(f, steps, beam_size, length_alpha, **ids)
        else:
            self.label = "greedy"
            fn = lambda f: model.greedy(f, steps, **ids)
        # The decoding loops stop early with data-dependent shapes, which XLA cannot compile.
        self._decode = tf.function(fn, input_signature=[tf.TensorSpec([None, NUM_CELLS, FEATURE_DIM], tf.float32)])

    @classmethod
    def from_config(
        cls, model: ShowAttendTell, tokenizer: Tokenizer, caption_cfg: Any, strategy: str | None = None
    ) -> Decoder:
        """A decoder with the `caption` section's settings (`strategy` overrides `caption.strategy`)."""
        return cls(
            model,
            tokenizer,
            strategy or caption_cfg.strategy,
            caption_cfg.max_length,
            caption_cfg.beam_size,
            caption_cfg.length_alpha,
        )

    def __call__(self, features: np.ndarray) -> list[Caption]:
        """Captions of a batch of (B, 64, 2048) features."""
        tokens, attention, log_prob, lengths = (t.numpy() for t in self._decode(np.asarray(features, np.float32)))
        return [self._caption(*row) for row in zip(tokens, attention, log_prob, lengths)]

    def _caption(self, tokens: np.ndarray, attention: np.ndarray, log_prob: float, length: int) -> Caption:
        tk = self.tokenizer
        words, rows = [], []
        # Emitted tokens stop at <end> (which gets no word: it is not part of the caption).
        for step, i in enumerate(int(t) for t in tokens):
            if i in (tk.end_id, tk.pad_id):
                break
            if i != tk.start_id:
                words.append(tk.words[i])
                rows.append(attention[step])
        # (words, 64); (0, 64) when the first token is <end>: an empty caption, still scored.
        att = np.asarray(rows, np.float32).reshape(len(rows), NUM_CELLS)
        return Caption(" ".join(words), words, att, float(log_prob), int(length), attention[:length])
