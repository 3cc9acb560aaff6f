"""Evaluation: COCO metrics against pycocoevalcap called directly, the no-Java path, and the report
(valid PNG and self-contained HTML, one attention panel per generated word) from a tiny model."""

from __future__ import annotations

import base64
import contextlib
import io
from html.parser import HTMLParser
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from capray import evaluate
from capray.config import load_config
from capray.decoder import Caption, Decoder
from capray.model import ShowAttendTell
from capray.text import Tokenizer, clean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-made: 4 images, several references each, predictions from perfect to poor.
REFERENCES = {
    "a.jpg": ["A dog runs on the grass.", "A brown dog is running across a lawn", "The dog plays outside"],
    "b.jpg": ["Two children play in the snow", "Kids playing in snow.", "two kids are outside in the snow"],
    "c.jpg": ["A man rides a bicycle down the street", "A cyclist on a city road"],
    "d.jpg": ["A red car parked near a building", "A car is parked outside", "a red vehicle by a wall"],
}
PREDICTIONS = {
    "a.jpg": "a dog runs on the grass",
    "b.jpg": "two kids play in the snow",
    "c.jpg": "a man riding a bike on the road",
    "d.jpg": "a blue truck on a street",
}


def _direct(predictions: dict, references: dict) -> dict[str, float]:
    """pycocoevalcap exactly as COCOEvalCap.evaluate uses it (minus SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu = Bleu(4).compute_score(gts, res)[0]
        return {
            **{f"bleu{i + 1}": b for i, b in enumerate(bleu)},
            "meteor": Meteor().compute_score(gts, res)[0],
            "rouge_l": Rouge().compute_score(gts, res)[0],
            "cider": Cider().compute_score(gts, res)[0],
        }


@pytest.mark.skipif(not evaluate.java_available(), reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_metrics_agree_with_pycocoevalcap() -> None:
    # Two sets scored together (as `capray evaluate` scores its strategies, one METEOR process):
    # each gets the scores pycocoevalcap gives it alone.
    perfect = {k: refs[0] for k, refs in REFERENCES.items()}
    both = evaluate.score_of({"mixed": PREDICTIONS, "perfect": perfect}, REFERENCES)
    ours = both["mixed"]
    direct = _direct(PREDICTIONS, REFERENCES)
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    # Not degenerate: a real spread of values, one exact match out of four.
    assert 0.2 < ours["bleu4"] < 0.9 and 0.1 < ours["meteor"] < 0.9 and ours["cider"] > 0.5
    assert ours["exact_match"] == 0.25 and ours["images"] == 4 and ours["notes"] == []
    assert both["perfect"]["bleu4"] == pytest.approx(1.0, abs=1e-9) and both["perfect"]["meteor"] > ours["meteor"]
    assert both["perfect"]["exact_match"] == 1.0


def test_perfect_match_scores_bleu4_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # capray's own tokens (the PTB ones: the test above)
    perfect = {k: refs[0] for k, refs in REFERENCES.items()}
    m = evaluate.score(perfect, REFERENCES)
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-9)
    assert m["exact_match"] == 1.0 and m["rouge_l"] == pytest.approx(1.0)


def test_without_java_meteor_is_skipped_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `java` to find
    m = evaluate.score(PREDICTIONS, REFERENCES)
    assert "meteor" not in m
    assert m["notes"] == [evaluate.NO_JAVA] and "METEOR skipped: no Java" in m["notes"][0]
    # Without the PTB tokenizer, the same pycocoevalcap scorers run on capray.text.caption_words' tokens,
    # with every reference of each image.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {k: [" ".join(clean(r)) for r in refs] for k, refs in REFERENCES.items()}
    res = {k: [" ".join(clean(p))] for k, p in PREDICTIONS.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        assert m["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][3], abs=1e-12)
        assert m["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
        assert m["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert m["exact_match"] == 0.25  # "A dog runs on the grass." matches after normalisation


def test_unknown_prediction_is_an_error() -> None:
    with pytest.raises(KeyError, match="no references"):
        evaluate.score({"zzz.jpg": "a dog"}, REFERENCES)


# --- report -------------------------------------------------------------------------------------


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def decoded() -> tuple[list[Caption], np.ndarray]:
    """A tiny untrained model's greedy and beam captions of 3 random images."""
    tokenizer = Tokenizer.fit([c for refs in REFERENCES.values() for c in refs], max_length=8)
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(tokenizer.vocab_size, embedding_dim=16, units=32).build_all()
    infer = load_config(None, ["caption.beam_size=2"]).caption
    features = np.random.default_rng(0).random((3, 64, 2048), dtype=np.float32)
    greedy = Decoder.from_config(model, tokenizer, infer, "greedy")(features)
    beam = Decoder.from_config(model, tokenizer, infer, "beam")(features)
    tokens = model.greedy(features, 7, start_id=tokenizer.start_id, end_id=tokenizer.end_id)[0].numpy()
    # The words and panels are exactly the emitted tokens up to <end>.
    assert [c.text for c in greedy] == [tokenizer.decode(t) for t in tokens]
    for c in greedy + beam:
        assert c.attention.shape == (len(c.words), 64)
        assert np.allclose(c.attention.sum(axis=1), 1.0, atol=1e-4)  # softmax over the 64 cells
    pixels = np.random.default_rng(1).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    return [greedy, beam], pixels


def test_a_caption_that_ends_at_once_is_empty_not_an_error() -> None:
    # Found by the pipeline test: a weakly trained model's first token can be <end>.
    tokenizer = Tokenizer.fit(["a dog runs"], max_length=6)
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(tokenizer.vocab_size, embedding_dim=8, units=16).build_all()
    bias = model.fc2.bias.numpy()
    bias[tokenizer.end_id] = 1e4  # <end> always wins
    model.fc2.bias.assign(bias)
    infer = load_config(None, ["caption.beam_size=2"]).caption
    features = np.random.default_rng(0).random((2, 64, 2048), dtype=np.float32)
    for strategy in ("greedy", "beam"):
        for cap in Decoder.from_config(model, tokenizer, infer, strategy)(features):
            assert (cap.text, cap.words, cap.attention.shape) == ("", [], (0, 64))


def test_attention_figure_has_one_panel_per_word(decoded) -> None:
    (greedy, _), pixels = decoded
    rng = np.random.default_rng(2)
    made = Caption(
        "a dog runs on the green grass", ["a", "dog", "runs", "on", "the", "green", "grass"], rng.random((7, 64))
    )
    for cap in [*greedy, made]:
        fig = evaluate.attention_figure(pixels[0], cap)
        assert len(fig.axes) == len(cap.words)
        assert [ax.get_title() for ax in fig.axes] == cap.words
    up = evaluate.upsample(made.attention[0], 299)
    assert up.shape == (299, 299) and up.min() >= made.attention[0].min() - 1e-6


def test_report_files_are_valid_png_and_self_contained_html(decoded, tmp_path: Path) -> None:
    (greedy, beam), pixels = decoded
    items = [
        evaluate.ReportItem(
            f"/data/img{i}.jpg", pixels[i], REFERENCES["a.jpg"], {"greedy": greedy[i], "beam2": beam[i]}
        )
        for i in range(3)
    ]
    metrics = {"greedy": {"bleu4": 0.1, "cider": 0.2}, "beam2": {"bleu4": 0.3, "cider": 0.4}}
    out = evaluate.write_report(str(tmp_path / "report"), items, "test report", ["a note"], metrics)
    assert len(out["figures"]) == 3
    for path in out["figures"]:
        data = Path(path).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    page = Path(out["index"]).read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    parser.close()
    # Per item: the input image (JPEG) and its attention figure (PNG), both embedded: no external files.
    assert len(parser.sources) == 6
    for i, src in enumerate(parser.sources):
        kind = "jpeg" if i % 2 == 0 else "png"
        assert src.startswith(f"data:image/{kind};base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == kind.upper() and img.size[0] >= 299
    assert base64.b64decode(parser.sources[1].split(",", 1)[1]) == Path(out["figures"][0]).read_bytes()
    for text in ("test report", "a note", "beam2", "0.3000", "A dog runs on the grass."):
        assert text in page


@pytest.mark.parametrize("value", ["[greedy,topk]", "[]", "[beam,beam]"])
def test_bad_strategies_are_refused_with_the_key(value: str) -> None:
    from capray.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.strategies"):
        load_config(None, [f"evaluate.strategies={value}"])
