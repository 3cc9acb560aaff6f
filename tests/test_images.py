"""Data tests: decoding of awkward and broken image files."""

from __future__ import annotations

import numpy as np
import pytest

from capray.images import ImageDecodeError, decode
from imagezoo import TEST_MAX_PIXELS, bad_images, good_images


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


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_broken_images_raise_with_a_reason(name: str) -> None:
    data, reason = bad_images()[name]
    with pytest.raises(ImageDecodeError, match=reason):
        decode(data, TEST_MAX_PIXELS)
