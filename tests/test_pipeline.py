"""System test: every job, through the same entry point users call, on a real local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from capray import cli, evaluate, synthetic
from capray.config import load_config, output_paths
from capray.text import clean

REPO = Path(__file__).resolve().parents[1]
# Small but complete: 64 scenes, 2 epochs, 1 training worker (2 workers are test_train.py's).
OVERRIDES = [
    "data.synthetic_images=64",
    "data.synthetic_heldout=12",
    "train.epochs=2",
    "train.batch_size=16",
    "ray.num_workers=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict:
    work = tmp_path_factory.mktemp("pipeline")
    # Relative paths, as users type them (`make demo` uses outputs/demo): Ray workers run in
    # other directories and must still find every output.
    old = os.getcwd()
    os.chdir(work)
    try:
        args = [str(REPO / "configs/demo.yaml"), "work_dir=out", *OVERRIDES]
        assert cli.main(args, job="extract") == 0
        # The training job evaluates its best checkpoint at the end when asked (greedy only here).
        assert (
            cli.main(
                [*args, "evaluate.after_train=true", "evaluate.strategies=[greedy]", "evaluate.report_images=0"],
                job="train",
            )
            == 0
        )
        best = json.loads(Path("out/runs/demo/best.json").read_text())["checkpoint"]
        after_train = json.loads((Path(best) / "eval_val.json").read_text())
        synthetic.generate("heldout", 12, seed=99, prefix="heldout")
        Path("heldout/images/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        # The caption job writes its overview page at the end when asked (runner.run_job).
        caption = [*args, "caption.input=heldout/images", "overview.after_job=true", "overview.gallery=3"]
        assert cli.main(caption, job="caption") == 0
        assert cli.main([*args, "evaluate.report_images=2"], job="evaluate") == 0
        assert cli.main([*args, "output=exported"], job="export") == 0
        refused = cli.main([*args, "output=exported"], job="export")  # exists, and no --overwrite
    finally:
        os.chdir(old)
    cfg = load_config(REPO / "configs/demo.yaml", [f"work_dir={work / 'out'}", *OVERRIDES])
    return {"work": work, "cfg": cfg, "after_train": after_train, "export_refused": refused}


def test_extract_writes_one_row_per_image_and_config(run: dict) -> None:
    p = output_paths(run["cfg"])
    table = pq.read_table(p["features"])
    split = pd.read_parquet(p["split"])
    assert sorted(table["image"].to_pylist()) == sorted(split["image"].unique())
    assert set(table["dtype"].to_pylist()) == {"float16"}
    assert len(table["features"][0].as_py()) == 64 * 2048 * 2
    saved = (Path(p["features"]) / "_capray_config.yaml").read_text()
    assert "weights: random" in saved


def test_train_writes_checkpoints_and_best(run: dict) -> None:
    best = json.loads(Path(output_paths(run["cfg"])["best"]).read_text())
    ckpt = Path(best["checkpoint"])
    for name in ("model.weights.h5", "optimizer.npz", "tokenizer.json", "config.yaml", "state.json"):
        assert (ckpt / name).is_file(), name
    # best.json is the epoch with the lowest validation loss, and its copy is that checkpoint.
    run_dir = Path(output_paths(run["cfg"])["runs"]) / "demo"
    epochs = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/state.json")]
    assert sorted(s["epoch"] for s in epochs) == [1, 2]
    lowest = min(epochs, key=lambda s: s["metrics"]["val_loss"])
    assert best["metrics"] == lowest["metrics"]
    assert json.loads((ckpt / "state.json").read_text())["metrics"] == lowest["metrics"]


def test_caption_writes_one_row_per_image_with_errors(run: dict) -> None:
    rows = pd.read_parquet(output_paths(run["cfg"])["captions"])
    assert len(rows) == 13 and rows["image"].is_unique
    assert list(rows.columns) == [
        "image",
        "caption",
        "log_prob",
        "num_tokens",
        "strategy",
        "model",
        "error",
        "image_version",
    ]
    broken = rows[rows["image"].str.endswith("broken.jpg")].iloc[0]
    assert "cannot decode" in broken["error"] and pd.isna(broken["caption"])
    good = rows[rows["error"].isna()]
    assert len(good) == 12 and (good["num_tokens"] >= 1).all()
    assert (good["strategy"] == "greedy").all()
    page = (Path(output_paths(run["cfg"])["captions"]) / "_status" / "overview.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 6 and "broken.jpg" in page


def test_evaluate_scores_the_validation_split(run: dict) -> None:
    best = json.loads(Path(output_paths(run["cfg"])["best"]).read_text())
    result = json.loads((Path(best["checkpoint"]) / "eval_val.json").read_text())
    val_images = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")["image"].nunique()
    assert result["images"] == val_images and result["split"] == "val"
    assert list(result["metrics"]) == ["greedy", "beam3"]
    # The scores are those of the best checkpoint's own greedy captions of the validation images,
    # decoded here without the job: the right checkpoint, split, features and references.
    predictions = _greedy_captions(best["checkpoint"], run["cfg"])
    split = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")
    references = split.groupby("image")["caption"].apply(list).to_dict()
    assert sorted(predictions) == sorted(references)
    exact = sum(" ".join(clean(predictions[i])) in {" ".join(clean(r)) for r in references[i]} for i in references)
    greedy = result["metrics"]["greedy"]
    assert greedy["exact_match"] == exact / len(references)
    expected = evaluate.score(predictions, references)
    for name in ("bleu1", "bleu4", "rouge_l", "cider", "meteor"):
        assert greedy.get(name) == expected.get(name), name
    assert ("meteor" in greedy) == (not any("METEOR skipped" in n for n in result["notes"]))
    # Evaluating at the end of training scored the same checkpoint the same way.
    assert run["after_train"]["metrics"]["greedy"] == greedy
    assert any("backbone.weights=random" in n for n in result["notes"])
    report = Path(result["report"])
    assert report == Path(best["checkpoint"]) / "report_val" / "index.html"
    assert sorted(p.name for p in report.parent.glob("*.png")) == ["000_attention.png", "001_attention.png"]
    page = report.read_text(encoding="utf-8")
    # Two attention figures and the loss curves (the checkpoint has loss.png).
    assert page.count("data:image/png;base64,") == 3 and page.count("data:image/jpeg;base64,") == 2


def test_train_can_evaluate_at_the_end(run: dict) -> None:
    assert list(run["after_train"]["metrics"]) == ["greedy"]
    val_images = pd.read_parquet(output_paths(run["cfg"])["split"]).query("split == 'val'")["image"].nunique()
    assert run["after_train"]["images"] == val_images and "report" not in run["after_train"]


def test_training_writes_tensorboard_curves_and_a_loss_plot(run: dict) -> None:
    import tensorflow as tf

    from capray.train.curves import TAGS

    p = output_paths(run["cfg"])
    reported = sorted(
        json.loads(f.read_text())["step"] for f in (Path(p["runs"]) / "demo").glob("checkpoint_*/state.json")
    )
    assert len(reported) == 2  # two epochs, one report each
    values: dict[str, list[int]] = {}
    for f in Path(p["tensorboard"]).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(event.step)
    assert {tag: sorted(steps) for tag, steps in values.items()} == {tag: reported for tag in TAGS}
    best = Path(json.loads(Path(p["best"]).read_text())["checkpoint"])
    assert (best / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The evaluation report shows the curves too.
    page = (best / "report_val" / "index.html").read_text(encoding="utf-8")
    assert "training and validation loss per step" in page


def test_the_exported_savedmodel_captions_like_the_job_without_capray(run: dict) -> None:
    import subprocess
    import sys

    exported = run["work"] / "exported"
    captions = output_paths(run["cfg"])["captions"]
    # A fresh process that never imports capray: what a deployment has.
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/savedmodel_agreement.py"), str(exported), captions],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=run["work"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["capray_imported"] is False and result["images"] == 12
    assert result["agreement"] >= 0.95, result["differ"]
    shown = subprocess.run(
        [
            str(Path(sys.executable).parent / "saved_model_cli"),
            "show",
            "--dir",
            str(exported),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for line in ("inputs['images']", "DT_STRING", "outputs['caption']", "outputs['log_prob']", "outputs['num_tokens']"):
        assert line in shown.stdout
    assert run["export_refused"] == 9  # the folder exists and --overwrite was not given (docs/cli.md)


def _greedy_captions(checkpoint_uri: str, cfg) -> dict[str, str]:
    """Each validation image's greedy caption from the checkpoint, decoded directly."""
    from capray import checkpoint
    from capray.featurestore import decode_features

    model, tokenizer, _, _ = checkpoint.load(checkpoint_uri)
    split = pd.read_parquet(output_paths(cfg)["split"])
    val = set(split.query("split == 'val'")["image"])
    table = pq.read_table(output_paths(cfg)["features"]).to_pandas()
    table = table[table["image"].isin(val)]
    feats = decode_features(list(table["features"]), table["dtype"].iloc[0])
    tokens = model.greedy(feats, tokenizer.max_length - 1, start_id=tokenizer.start_id, end_id=tokenizer.end_id)[
        0
    ].numpy()
    return {image: tokenizer.decode(t) for image, t in zip(table["image"], tokens)}
