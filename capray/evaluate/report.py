"""The evaluation report: for a few images, the image, its generated captions, its references and,
per generated word, the 8x8 attention weights upsampled over the 299x299 image the model saw.

One self-contained HTML page (templates/report.html, images embedded as data URIs) plus one PNG
of attention panels per image.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from capray.evaluate.metrics import METRICS

if TYPE_CHECKING:
    from capray.decoder import Caption


def upsample(weights: np.ndarray, size: int) -> np.ndarray:
    """64 attention weights -> the 8x8 grid bilinearly resized to (size, size)."""
    from PIL import Image

    grid = np.asarray(weights, np.float32).reshape(8, 8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))


def attention_figure(pixels: np.ndarray, caption: Caption, columns: int = 5) -> Any:
    """A matplotlib Figure with one panel per generated word: the image under its attention map."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    n = len(caption.words)
    rows, cols = max(1, math.ceil(n / columns)), max(1, min(n, columns))
    fig = Figure(figsize=(1.9 * cols, 2.05 * rows), dpi=72)
    size = pixels.shape[0]
    for j, word in enumerate(caption.words):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(pixels)
        # The colour scale is per panel (where this word looks), as in the TF tutorial's plots.
        ax.imshow(upsample(caption.attention[j], size), cmap="jet", alpha=0.45, extent=(0, size, size, 0))
        ax.set_title(word, fontsize=11)
        ax.axis("off")
    if not n:
        fig.text(0.5, 0.5, "(empty caption: no words)", ha="center", va="center")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.2)
    return fig


def _png(fig: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    # A 256-colour palette makes the files ~3x smaller with no visible loss on these heat maps.
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _image_jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    # JPEG: the input photo is a fifth of its PNG size, which keeps the one-file page small.
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ReportItem:
    """One image of a report: its URI, pixels (299, 299, 3), references and captions by strategy."""

    image: str
    pixels: np.ndarray
    references: list[str]
    captions: dict[str, Caption]


@lru_cache(maxsize=1)
def _template() -> Any:
    import jinja2

    # Autoescaping: captions, references and file names are data, never markup.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("capray.evaluate", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html")


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def write_report(
    out: str,
    items: Sequence[ReportItem],
    title: str,
    notes: Sequence[str] = (),
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    storage_cfg: Any = None,
    loss_png: bytes | None = None,
) -> dict[str, Any]:
    """PNG attention figures (of each item's first strategy) and one self-contained index.html under
    `out`; with `loss_png`, the run's loss curves on the page too."""
    from capray.storage import join, write_bytes

    table = None
    if metrics:
        labels = list(metrics)
        names = [m for m in METRICS if any(m in metrics[s] for s in labels)]
        table = {"labels": labels, "rows": [(m, [metrics[s].get(m) for s in labels]) for m in names]}
    shown, files = [], []
    for i, item in enumerate(items):
        label, first = next(iter(item.captions.items()))
        png = _png(attention_figure(item.pixels, first))
        files.append(join(out, f"{i:03d}_attention.png"))
        write_bytes(files[-1], png, storage_cfg)
        shown.append(
            {
                "name": item.image.rsplit("/", 1)[-1],
                "photo": _data_uri(_image_jpeg(item.pixels), "jpeg"),
                "captions": [(s, c.text) for s, c in item.captions.items()],
                "references": item.references,
                "label": label,
                "figure": _data_uri(png, "png"),
            }
        )
    curves = _data_uri(loss_png, "png") if loss_png else None
    page = _template().render(title=title, notes=list(notes), table=table, items=shown, curves=curves)
    index = join(out, "index.html")
    write_bytes(index, page.encode("utf-8"), storage_cfg)
    return {"index": index, "figures": files}
