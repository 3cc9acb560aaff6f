"""What an earlier capray wrote keeps loading with the same meaning after names changed.

`tests/data/checkpoint-cc697d5/` was written by capray at commit cc697d5 (before the Keras
model class became `ShowAttendTell` and the config sections `encoder`/`infer` became
`backbone`/`caption`): a tiny random-backbone checkpoint, and the greedy log-prob its decoder gave
for a seeded feature array then.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capray import checkpoint

OLD = Path(__file__).parent / "data" / "checkpoint-cc697d5"
# model.greedy(np.random.RandomState(0).rand(1, 64, 2048), 5)'s log-prob at cc697d5.
LOG_PROB_THEN = [-11.338191986083984]


def test_a_checkpoint_of_an_earlier_build_loads_with_its_backbone_and_decodes_as_it_did() -> None:
    assert "encoder:" in (OLD / "config.yaml").read_text()  # the old section name, as written then
    model, tokenizer, cfg, state = checkpoint.load(str(OLD))
    # A random backbone stays random (not the default imagenet), with its seed.
    assert (cfg.backbone.weights, cfg.backbone.seed) == ("random", 5) and state["step"] == 1
    features = np.random.RandomState(0).rand(1, 64, 2048).astype("float32")
    log_prob = model.greedy(features, 5, start_id=tokenizer.start_id, end_id=tokenizer.end_id)[2].numpy()
    np.testing.assert_allclose(log_prob.ravel(), LOG_PROB_THEN, rtol=1e-5)
