"""image_id extraction, downscaling to 224x224 RGB, and the reasons given for images that cannot be used."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.imaging import images
from imgemb_assets.core.imaging.images import (
    IMAGE_SIZE,
    DecodeGate,
    ImageLimits,
    ImageRejected,
    decode_cost_bytes,
    decode_thumbnail,
    downscale,
    encode_jpeg,
    image_id_from_key,
)
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource


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


# --- any file becomes a thumbnail or a rejection ---------------------------------------------------------------


def _dds_with_pixel_format(flags: int, fourcc: bytes) -> bytes:
    """A DDS file whose pixel format Pillow's DDS plugin does not implement: it raised
    NotImplementedError while identifying, which escaped `downscale` and failed the step."""
    data = bytearray(_encode(Image.new("RGBA", (8, 8)), "DDS"))
    data[80:88] = struct.pack("<I", flags) + fourcc  # DDS_PIXELFORMAT: flags, then FourCC
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_dds_with_pixel_format(0x4, b"ZZZZ"), id="dds-unimplemented-fourcc"),
        pytest.param(_dds_with_pixel_format(0x0, b"\0\0\0\0"), id="dds-unknown-flags"),
    ],
)
def test_a_file_whose_format_detection_raises_is_rejected(data: bytes) -> None:
    with pytest.raises(ImageRejected, match="not a JPEG, PNG or WebP image"):
        downscale(data)


def _exif_block(*entries: tuple[int, int, int, bytes]) -> bytes:
    """A little-endian EXIF block of one IFD: (tag, type, count, 4-byte value) entries."""
    ifd = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"Exif\x00\x00" + ifd + struct.pack("<I", 0)


def _jpeg_with_app1(image: Image.Image, app1: bytes) -> bytes:
    jpeg = _encode(image, "JPEG", quality=95)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


_ORIENTATION_6 = (0x0112, 3, 1, struct.pack("<HH", 6, 0))


@pytest.mark.parametrize(
    "other_entry",
    [
        # Each made ImageOps.exif_transpose fail re-serializing the EXIF block, which the
        # thumbnail does not even keep: struct.error and AttributeError escaped `downscale`.
        pytest.param((0xA005, 1, 4, b"\xdc\x0a\xbb\xfa"), id="interop-pointer-as-bytes"),
        pytest.param((0xA005, 8, 2, b"\x66\xa7\x75\x06"), id="interop-pointer-as-signed-shorts"),
        pytest.param((0x010F, 11, 1, b"\xf7\xd0\x12\x2a"), id="make-as-float"),
    ],
)
def test_an_odd_exif_tag_does_not_cost_the_image_its_orientation(other_entry: tuple[int, int, int, bytes]) -> None:
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    thumbnail = downscale(_jpeg_with_app1(image, _exif_block(_ORIENTATION_6, other_entry)))
    assert (thumbnail.width, thumbnail.height) == (100, 200)
    top = decode_thumbnail(thumbnail.jpeg)[10, 112]
    assert top[2] > 200 and top[0] < 60, "rotated: the displayed top is the stored left (blue) half"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_an_unreadable_exif_block_is_ignored_not_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    app1 = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00) + bytes(20)  # first IFD far past the block's end
    data = _jpeg_with_app1(_noise(120, 80), app1)
    assert (downscale(data).width, downscale(data).height) == (120, 80)  # Pillow warns and reads no tag

    def unparsable(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    # Should Pillow raise instead: the image is shown as stored, as browsers do, not rejected.
    monkeypatch.setattr(Image.Image, "getexif", unparsable)
    assert (downscale(data).width, downscale(data).height) == (120, 80)


def test_a_png_signature_with_a_broken_header_is_called_corrupt() -> None:
    data = _encode(_noise(20, 20), "PNG")
    with pytest.raises(ImageRejected, match="corrupt or truncated image data: starts as a PNG file"):
        downscale(data[:8] + b"\x00" * 8 + data[16:])  # IHDR's length and type gone


@pytest.mark.parametrize(
    ("error", "reason_part"),
    [
        (KeyError("mode"), "image cannot be decoded: KeyError: 'mode'"),
        (RuntimeError("decoder exploded"), "image cannot be decoded: RuntimeError: decoder exploded"),
        (NotImplementedError(), "image cannot be decoded: NotImplementedError"),
        (OSError("broken data stream"), "corrupt or truncated image data: OSError: broken data stream"),
        (Image.DecompressionBombError("too many pixels"), "image too large to decode safely: DecompressionBombError"),
    ],
)
def test_any_error_decoding_one_image_becomes_its_rejection_naming_the_error(
    monkeypatch: pytest.MonkeyPatch, error: Exception, reason_part: str
) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(images, "_to_rgb", failing)
    with pytest.raises(ImageRejected) as rejected:
        downscale(_encode(_noise(30, 20), "PNG"))
    assert reason_part in rejected.value.reason


def test_a_long_error_message_is_shortened_in_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise ValueError("x" * 5_000)

    monkeypatch.setattr(images, "_to_rgb", failing)
    with pytest.raises(ImageRejected) as rejected:
        downscale(_encode(_noise(30, 20), "PNG"))
    assert len(rejected.value.reason) < 400 and rejected.value.reason.endswith("...")


def _fail_with_memory_error(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """`_to_rgb` raises MemoryError the first `times` calls; returns the list counting calls."""
    calls: list[int] = []
    real = images._to_rgb

    def flaky(image: Image.Image) -> Image.Image:
        calls.append(1)
        if len(calls) <= times:
            raise MemoryError
        return real(image)

    monkeypatch.setattr(images, "_to_rgb", flaky)
    return calls


def test_memory_error_is_retried_once_alone_through_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_with_memory_error(monkeypatch, times=1)
    data = _encode(_noise(40, 30), "PNG")
    gate = DecodeGate(1 << 30)
    thumbnail = downscale(data, gate=gate)
    assert len(calls) == 2
    assert thumbnail.jpeg == downscale(data).jpeg
    assert gate.peak_bytes == gate.budget_bytes, "the retry is charged the whole budget: it decodes alone"


def test_memory_error_twice_rejects_the_image_instead_of_failing_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_with_memory_error(monkeypatch, times=2)
    with pytest.raises(ImageRejected, match=r"not enough memory to decode this image.*\(MemoryError\).*max_image_"):
        downscale(_encode(_noise(40, 30), "PNG"))
    assert len(calls) == 2


# --- the JPEG draft decode and the full-size setting -----------------------------------------------------------


def _large_photo_jpeg() -> bytes:
    """A plain 4:2:0 RGB JPEG of 1000x760 px with detail at every scale, so the draft decode shows."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:760, 0:1000]
    base = np.stack([128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0), (x ^ y) & 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def _pillow_thumbnail(data: bytes, draft: bool) -> bytes:
    """Pillow's plain open, (draft,) convert("RGB"), bilinear resize to 224, stored as the pipeline stores it."""
    with Image.open(io.BytesIO(data)) as image:
        if draft:
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return encode_jpeg(resized)


def test_full_size_jpeg_decode_gives_the_articles_pixels() -> None:
    data = _large_photo_jpeg()
    thumbnail = downscale(data, full_size_jpeg_decode=True)
    assert thumbnail.jpeg == _pillow_thumbnail(data, draft=False)
    assert (thumbnail.width, thumbnail.height) == (1000, 760)


def test_the_default_keeps_the_draft_decode() -> None:
    data = _large_photo_jpeg()
    thumbnail = downscale(data)
    assert thumbnail.jpeg == _pillow_thumbnail(data, draft=True)
    assert (thumbnail.width, thumbnail.height) == (1000, 760)
    assert thumbnail.jpeg != downscale(data, full_size_jpeg_decode=True).jpeg, "a 1000x760 JPEG is drafted (1/2 scale)"


def test_full_size_decode_changes_nothing_for_png_or_a_small_jpeg() -> None:
    for data in (_encode(_noise(900, 700), "PNG"), _encode(_noise(400, 300), "JPEG")):
        assert downscale(data).jpeg == downscale(data, full_size_jpeg_decode=True).jpeg


def test_full_size_decode_is_charged_its_full_size_at_the_gate() -> None:
    data = _large_photo_jpeg()
    drafted, full = DecodeGate(1 << 30), DecodeGate(1 << 30)
    downscale(data, gate=drafted)
    downscale(data, gate=full, full_size_jpeg_decode=True)
    with Image.open(io.BytesIO(data)) as image:
        assert full.peak_bytes == decode_cost_bytes(image)  # not drafted: 1000x760
        image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        assert drafted.peak_bytes == decode_cost_bytes(image)  # 500x380
    assert full.peak_bytes > 2 * drafted.peak_bytes


def test_the_resource_passes_the_setting_on() -> None:
    assert ImageLimits().full_size_jpeg_decode is False
    assert ImageLimitsResource().limits().full_size_jpeg_decode is False
    assert ImageLimitsResource(full_size_jpeg_decode=True).limits().full_size_jpeg_decode is True
