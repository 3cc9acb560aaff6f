"""Test data built once and shared: a tiny checkpoint, and work dirs that reuse extracted features."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from capray.config import load_config
from capray.text import Tokenizer

REPO = Path(__file__).resolve().parents[1]
# The scenes every shared-feature test trains on (configs/demo.yaml: random backbone, channel norm).
SYNTHETIC_IMAGES = 96


def write_tiny_checkpoint(directory: Path, units: int = 16) -> str:
    """An untrained but complete checkpoint (random InceptionV3, small decoder): the caption job's
    plumbing and fault handling do not depend on what the model learned, and training costs minutes."""
    import keras

    from capray import checkpoint
    from capray.model import ShowAttendTell, make_optimizer

    # Seeded: an untrained decoder's first word is a coin toss between `<end>` (an empty caption)
    # and a word; the tests that check captions are not empty need the same weights every session.
    keras.utils.set_random_seed(1)
    tokenizer = Tokenizer.fit(["a red circle", "two blue squares left of a green triangle"], max_length=6)
    cfg = load_config(None, ["backbone.weights=random", "model.embedding_dim=8", f"model.units={units}"])
    model = ShowAttendTell(tokenizer.vocab_size, 8, units).build_all()
    optimizer = make_optimizer(1e-3)
    optimizer.build(model.trainable_variables)
    checkpoint.write(str(directory), model, optimizer, tokenizer, cfg, {"epoch": 1, "step": 1})
    return str(directory)


def extract_synthetic(work: Path) -> Path:
    """Generate SYNTHETIC_IMAGES scenes under `work` and extract their features (needs Ray)."""
    from capray import extraction

    extraction.run(
        load_config(REPO / "configs/demo.yaml", [f"work_dir={work}", f"data.synthetic_images={SYNTHETIC_IMAGES}"])
    )
    return work


def reuse_features(shared: Path, work: Path) -> list[str]:
    """Overrides for a new work dir `work` whose features are the shared, already extracted ones.

    The features folder is a symbolic link (training only reads it) and the captions are the
    shared manifest, so the image names agree; split, tokenizer and runs are `work`'s own.
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "features").symlink_to(shared / "features", target_is_directory=True)
    return feature_overrides(shared, work)


def feature_overrides(shared: Path, work: Path) -> list[str]:
    """The overrides of a work dir made by `reuse_features(shared, work)`."""
    return [
        f"work_dir={work}",
        f"data.annotations={shared / 'data' / 'captions.csv'}",
        f"data.synthetic_images={SYNTHETIC_IMAGES}",
    ]


def upload_features(shared: Path, uri: str, storage_cfg) -> None:
    """Copy the shared features folder to `uri` (e.g. an s3:// work dir's `features`), file by file."""
    from capray import storage

    for path in sorted((shared / "features").iterdir()):
        storage.write_bytes(f"{uri}/{path.name}", path.read_bytes(), storage_cfg)


def checkpoint_states(run_dir: str) -> list[dict]:
    """Every kept checkpoint's state.json under a Ray Train run folder, in step order."""
    states = [json.loads(Path(p).read_text()) for p in glob.glob(f"{run_dir}/checkpoint_*/state.json")]
    return sorted(states, key=lambda s: s["step"])
