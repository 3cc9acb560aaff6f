"""Data tests: decoding of awkward and broken image files."""

from __future__ import annotations

import numpy as np
import pytest
from imagezoo import TEST_MAX_PIXELS, bad_images, encode, good_images, gray16

from capray.images import ImageDecodeError, decode


@pytest.mark.parametrize("name", sorted(good_images()))
def test_awkward_images_decode_to_rgb(name: str) -> None:
    pixels = decode(good_images()[name], TEST_MAX_PIXELS)
    assert pixels.shape == (299, 299, 3) and pixels.dtype == np.uint8


def test_exif_orientation_is_applied() -> None:
    pixels = decode(good_images()["rotated.jpg"], TEST_MAX_PIXELS).astype(int)
    # Stored left-red/right-blue, displayed rotated 90 degrees clockwise: red on top.
    top, bottom = pixels[40, 150], pixels[260, 150]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_transparent_pixels_become_white_and_gray_becomes_rgb() -> None:
    alpha = decode(good_images()["alpha.png"], TEST_MAX_PIXELS)
    assert (alpha[150, 20] > 245).all() and alpha[150, 280].tolist()[1] > 150
    gray = decode(good_images()["gray.jpg"], TEST_MAX_PIXELS)
    assert (gray[..., 0] == gray[..., 1]).all()


def test_cmyk_matches_the_rgb_original() -> None:
    rgb = decode(good_images()["scene.jpg"], TEST_MAX_PIXELS).astype(int)
    cmyk = decode(good_images()["cmyk.jpg"], TEST_MAX_PIXELS).astype(int)
    assert np.abs(rgb - cmyk).mean() < 12


def _encoded(values: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    return encode(Image.fromarray(values), fmt)


def test_16_bit_grayscale_reads_by_its_top_8_bits_as_tensorflow_does() -> None:
    # PIL's convert("RGB") clips 16-bit values to 255: this ramp came out 254.5 grey on average.
    eight = decode(_encoded((gray16() >> 8).astype(np.uint8)), TEST_MAX_PIXELS)
    assert 120 < eight.mean() < 135
    assert (decode(good_images()["gray16.png"], TEST_MAX_PIXELS) == eight).all()
    # A 32-bit integer TIFF of 16-bit values (PIL mode I) reads the same.
    assert (decode(_encoded(gray16().astype(np.int32), "TIFF"), TEST_MAX_PIXELS) == eight).all()


@pytest.mark.parametrize(
    "values", [gray16().astype(np.float32) / 65535, gray16().astype(np.int32) * 4], ids=["float", "int32"]
)
def test_pixels_without_a_defined_8_bit_range_are_refused(values: np.ndarray) -> None:
    with pytest.raises(ImageDecodeError, match=r"^cannot decode image: 32-bit .* have no defined 8-bit range"):
        decode(_encoded(values, "TIFF"), TEST_MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_broken_images_raise_with_a_reason(name: str) -> None:
    data, reason = bad_images()[name]
    with pytest.raises(ImageDecodeError, match=reason):
        decode(data, TEST_MAX_PIXELS)


def _large_jpeg(photo: bytes, size: tuple[int, int] = (4000, 3000)) -> bytes:
    """A phone-sized JPEG (quality 90) made by upscaling a photo."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize(size, Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_large_jpegs_decode_in_draft_mode_to_near_the_full_decode(flickr_dev) -> None:
    # Bound chosen and stated in docs/performance.md: mean |draft - full| <= 2/255 after the resize
    # (measured ~0.7), and no pixel moved by more than a quarter of the range.
    for path in sorted((flickr_dev / "images").glob("*.jpg"))[:3]:
        photo = path.read_bytes()
        big = _large_jpeg(photo)
        draft, full = decode(big, 64_000_000), decode(big, 64_000_000, draft=False)
        assert draft.shape == full.shape == (299, 299, 3) and draft.dtype == np.uint8
        diff = np.abs(draft.astype(int) - full.astype(int))
        assert diff.mean() <= 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
        # Photos under twice the target size are decoded at full size: identical pixels.
        assert np.array_equal(decode(photo, TEST_MAX_PIXELS), decode(photo, TEST_MAX_PIXELS, draft=False))


def test_draft_mode_leaves_other_formats_alone() -> None:
    png = good_images()["alpha.png"]
    assert np.array_equal(decode(png, TEST_MAX_PIXELS), decode(png, TEST_MAX_PIXELS, draft=False))
