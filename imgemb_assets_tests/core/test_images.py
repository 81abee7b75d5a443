"""image_id extraction, downscaling to 224x224 RGB, and the reasons given for images that cannot be used."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.images import (
    IMAGE_SIZE,
    ImageRejected,
    decode_thumbnail,
    downscale,
    image_id_from_key,
)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("2026-11-01/img_0001.jpg", "img_0001"),
        ("raw-images/2026-11-01/img_0001.jpeg", "img_0001"),
        ("2026-11-01/photo.v2.png", "photo.v2"),
        ("2026-11-01/sub/folder/item 7.webp", "item 7"),
        ("2026-11-01/README", None),
        ("2026-11-01/.hidden", None),
        # a dot in a folder name must not give an extension-less file an id
        ("2026-11-01/a.b/c", None),
    ],
)
def test_image_id_is_the_file_name_without_its_extension(key: str, expected: str | None) -> None:
    assert image_id_from_key(key) == expected


@pytest.mark.parametrize(("width", "height"), [(640, 480), (100, 900), (1, 1), (224, 224)])
def test_downscale_makes_a_224_rgb_jpeg_and_keeps_the_original_size(width: int, height: int) -> None:
    thumbnail = downscale(_encode(_noise(width, height), "JPEG"))
    assert (thumbnail.width, thumbnail.height) == (width, height)
    with Image.open(io.BytesIO(thumbnail.jpeg)) as stored:
        assert stored.format == "JPEG"
        assert stored.mode == "RGB"
        assert stored.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert decode_thumbnail(thumbnail.jpeg).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_downscale_matches_a_plain_bilinear_resize_of_the_decoded_image() -> None:
    # A smooth image, so JPEG loss stays small and the comparison is about geometry.
    ramp = np.linspace(0, 255, 300, dtype=np.float64)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None] * 0.5, 128.0), axis=-1).astype(np.uint8)
    source = Image.fromarray(pixels)
    thumbnail = decode_thumbnail(downscale(_encode(source, "PNG")).jpeg).astype(int)
    expected = np.asarray(source.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(thumbnail - expected).mean() < 1.5


def test_png_and_webp_are_accepted_by_content() -> None:
    for fmt in ("PNG", "WEBP"):
        assert downscale(_encode(_noise(50, 40), fmt)).width == 50


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue, right half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    thumbnail = downscale(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert (thumbnail.width, thumbnail.height) == (100, 200)
    pixels = decode_thumbnail(thumbnail.jpeg)
    top, bottom = pixels[10, 112], pixels[-10, 112]
    assert top[2] > 200 and top[0] < 60, "displayed top comes from the stored left (blue) half"
    assert bottom[0] > 200 and bottom[2] < 60


def test_transparent_pixels_are_composited_on_white() -> None:
    image = Image.new("RGBA", (64, 64), (0, 255, 0, 0))  # fully transparent green
    pixels = decode_thumbnail(downscale(_encode(image, "PNG")).jpeg)
    assert pixels.min() > 245


def test_grayscale_becomes_three_channels() -> None:
    pixels = decode_thumbnail(downscale(_encode(Image.new("L", (30, 30), 77), "PNG")).jpeg)
    assert np.allclose(pixels, 77, atol=2)


@pytest.mark.parametrize(
    ("data", "reason_part"),
    [
        (b"", "empty file"),
        (b"<!DOCTYPE html><html>403</html>", "not a JPEG, PNG or WebP"),
        (b"GIF89a" + bytes(100), "not a JPEG, PNG or WebP"),
    ],
)
def test_unusable_content_is_rejected_with_a_reason(data: bytes, reason_part: str) -> None:
    with pytest.raises(ImageRejected) as rejected:
        downscale(data)
    assert reason_part in rejected.value.reason


def test_truncated_jpeg_is_rejected_not_padded() -> None:
    data = _encode(_noise(400, 300), "JPEG")
    with pytest.raises(ImageRejected, match="truncated"):
        downscale(data[: len(data) // 2])


def test_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ImageRejected, match="too large"):
        downscale(_encode(_noise(100, 100), "PNG"), max_pixels=5_000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, then we refuse
@pytest.mark.parametrize("pixels", [1_500, 3_000])  # Pillow's warning band, and past its hard limit
def test_decompression_bombs_are_refused_under_pillows_limit(monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(ImageRejected, match="too large"):
        downscale(_encode(_noise(pixels // 10, 10), "PNG"))
