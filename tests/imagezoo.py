"""The image zoo: good, awkward and broken inputs that every image-reading job must handle."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from capray import synthetic

# A pixel limit the tests configure (data.max_pixels) so that `huge.png` is refused cheaply.
TEST_MAX_PIXELS = 1_000_000


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(size: tuple[int, int] = (300, 200)) -> Image.Image:
    """Left half red, right half blue: orientation mistakes are visible."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return img


def gray16() -> np.ndarray:
    """A 16-bit greyscale ramp, black to white: read with 8-bit rules it is nearly all white."""
    return (np.arange(300 * 400, dtype=np.int64) * 65535 // (300 * 400 - 1)).reshape(300, 400).astype(np.uint16)


def good_images() -> dict[str, bytes]:
    """Inputs that must decode: plain JPEG, grayscale, 16-bit grayscale PNG, RGBA PNG, CMYK,
    EXIF-rotated, odd key."""
    scene = synthetic.render(seed=5, index=0)[0]
    rgba = Image.new("RGBA", (120, 80), (0, 200, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 60, 80))  # left half fully transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return {
        "scene.jpg": encode(scene, "JPEG", quality=95),
        "gray.jpg": encode(scene.convert("L"), "JPEG"),
        "gray16.png": encode(Image.fromarray(gray16()), "PNG"),
        "alpha.png": encode(rgba, "PNG"),
        "cmyk.jpg": encode(scene.convert("CMYK"), "JPEG"),
        "rotated.jpg": encode(halves(), "JPEG", exif=exif.tobytes(), quality=95),
        "dir with space/ünïcode café.jpg": encode(scene, "JPEG"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Inputs that must fail, with a fragment of the expected error."""
    full = encode(synthetic.render(seed=5, index=1)[0], "JPEG")
    return {
        "truncated.jpg": (full[: len(full) // 2], "cannot decode"),
        "empty.jpg": (b"", "empty file"),
        "notes.jpg": (b"this is a text file, not a JPEG\n", "cannot decode"),
        "huge.png": (encode(Image.new("L", (1500, 1000)), "PNG"), "too large"),
    }


def tar_shard(samples: dict[str, bytes], captions: bool = True, cut: int = 0) -> bytes:
    """A WebDataset tar as img2dataset writes it: `<key>.jpg`, `<key>.txt`, `<key>.json` per
    sample. `cut` > 0 truncates the archive to that many bytes."""
    import json
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in samples.items():
            members = {f"{key}.jpg": data, f"{key}.json": json.dumps({"key": key}).encode()}
            if captions:
                members[f"{key}.txt"] = f"caption of {key}".encode()
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    return raw[:cut] if cut else raw
