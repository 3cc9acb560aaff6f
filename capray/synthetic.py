"""Built-in synthetic captioning dataset: scenes of coloured shapes with exact captions.

Each scene's caption is a deterministic function of its pixels (colour, shape, count and
left/right position), so a model that learns the task can reach exact-match accuracy; the
demo and the learning tests rely on that.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from capray.schema import Config

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {2: "two", 3: "three"}
IMAGE_SIZE = 299


@dataclass(frozen=True)
class Shape:
    """One drawn object: colour name, shape name, centre and half-size in pixels."""

    colour: str
    shape: str
    cx: int
    cy: int
    r: int


def _draw(draw: ImageDraw.ImageDraw, obj: Shape) -> None:
    fill = COLOURS[obj.colour]
    box = (obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(obj.cx, obj.cy - obj.r), (obj.cx - obj.r, obj.cy + obj.r), (obj.cx + obj.r, obj.cy + obj.r)],
            fill=fill,
        )


def _scene(rng: random.Random) -> tuple[list[Shape], str]:
    """Pick a scene layout and return its objects and canonical caption."""
    kind = rng.choices(["single", "pair", "count"], weights=[2, 5, 2])[0]
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if kind == "single":
        obj = Shape(colour, shape, rng.randint(90, 209), rng.randint(90, 209), rng.randint(35, 60))
        return [obj], f"a {colour} {shape}"
    if kind == "pair":
        while True:
            c2, s2 = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (c2, s2) != (colour, shape):
                break
        # Left object in the left third, right object in the right third: "left of" is unambiguous.
        left = Shape(colour, shape, rng.randint(50, 100), rng.randint(60, 239), rng.randint(25, 42))
        right = Shape(c2, s2, rng.randint(199, 249), rng.randint(60, 239), rng.randint(25, 42))
        return [left, right], f"a {colour} {shape} left of a {c2} {s2}"
    n = rng.choice(list(COUNT_WORDS))
    xs = [50 + i * (200 // (n - 1)) for i in range(n)]
    objs = [Shape(colour, shape, x + rng.randint(-8, 8), rng.randint(70, 229), rng.randint(22, 32)) for x in xs]
    return objs, f"{COUNT_WORDS[n]} {colour} {shape}s"


def render(seed: int, index: int) -> tuple[Image.Image, str]:
    """Render scene `index` of the dataset with `seed`; the same arguments give the same image."""
    rng = random.Random(f"{seed}:{index}")
    objs, caption = _scene(rng)
    grey = rng.randint(200, 250)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for obj in objs:
        _draw(draw, obj)
    return img, caption


def generate(out_dir: str | Path, num_images: int, seed: int = 0, prefix: str = "scene") -> Path:
    """Write `num_images` JPEG scenes and `captions.csv` (image,caption) under `out_dir`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "captions.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(num_images):
            name = f"{prefix}_{seed}_{i:06d}.jpg"
            img, caption = render(seed, i)
            img.save(out / "images" / name, quality=90)
            writer.writerow([name, caption])
    return manifest


def ensure(cfg: Config) -> str:
    """For `data.format=synthetic`: the dataset's captions file, generated once if absent.

    The config is not changed: a job that reads the dataset uses a derived config, e.g.
    `config.updated(cfg, {"data": {"annotations": ensure(cfg)}})`.
    """
    from capray import storage
    from capray.config import ConfigError, output_paths

    manifest = cfg.data.annotations or storage.join(output_paths(cfg)["data"], "captions.csv")
    if storage.is_remote(manifest):
        raise ConfigError(f"data.annotations={manifest}: the synthetic dataset is generated on local disk")
    if not Path(manifest).exists():
        log.info("generating %d synthetic scenes in %s", cfg.data.synthetic_images, Path(manifest).parent)
        generate(Path(manifest).parent, cfg.data.synthetic_images, cfg.data.synthetic_seed)
    return manifest
