"""Decoding, orienting, converting and downscaling images, and naming why one cannot be used."""

from __future__ import annotations

import io
import re
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

IMAGE_SIZE: Final = 224
# Decoding is by content: a file named .jpg that holds anything else is refused.
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP")
# Thumbnails are stored as JPEG; high quality and no chroma subsampling keep the
# stored pixels close to the resized image the model would have seen in memory.
THUMBNAIL_JPEG_QUALITY: Final = 95
# The article's rule: the file name without its extension.
_IMAGE_ID_PATTERN: Final = re.compile(r"([^/]+)\.[^.]+$")
_EXIF_ORIENTATION_TAG: Final = 0x0112
# What ImageOps.exif_transpose does for each EXIF orientation, without its
# re-serializing of the EXIF block (which can fail, and the thumbnail keeps no EXIF).
_TRANSPOSE_BY_ORIENTATION: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATIONS_SWAPPING_AXES: Final = frozenset({5, 6, 7, 8})
# Single-channel modes holding more than 8 bits per pixel (16-bit PNGs open as
# I;16); convert("RGB") would clip them at 255 instead of scaling them.
_WIDE_GRAY_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_SIXTEEN_BIT_MAX: Final = 65535
# A decoder's error message quoted in a rejection reason is cut to this length.
_MAX_ERROR_MESSAGE_CHARS: Final = 300
# Modes whose embedded ICC profile is honoured when converting to sRGB.
_ICC_CONVERTIBLE_MODES: Final = frozenset({"RGB", "CMYK"})


# Originals larger than this are not downloaded: 50 MiB is several times a
# full-resolution camera JPEG.
DEFAULT_MAX_IMAGE_BYTES: Final = 50 << 20
# What the decodes running at once may hold. A 16-megapixel RGBA PNG costs about
# 390 MB to decode and resize; a JPEG, decoded at reduced scale, a few MB.
DEFAULT_MAX_DECODE_BYTES: Final = 1 << 30
# Peak bytes per pixel of `downscale` by the mode Pillow decodes to (after any JPEG
# draft), measured with Pillow 13 on 16-megapixel images (RSS peak over the
# pixel count: L/P 6.2, RGB 12.2, P with transparency 18.2, I;16 21.7, RGBA/LA
# 24.2, RGBA WebP 32.1), rounded up with headroom.
_DECODE_BYTES_PER_PIXEL: Final = {"1": 8, "L": 8, "P": 8, "RGB": 16, "YCbCr": 16, "CMYK": 16, "LAB": 16, "HSV": 16}
_DECODE_BYTES_PER_PIXEL_OTHER: Final = 32  # alpha, 16-bit and 32-bit modes
_DECODE_BYTES_PER_PIXEL_WEBP_EXTRA: Final = 8  # libwebp decodes into its own buffer first
_DECODE_FIXED_BYTES: Final = 2 << 20  # decoder state, the 224x224 result and its JPEG
# Pillow stores large images in blocks of this size (its default is 16 MiB). glibc
# serves a freed 16 MiB block's successors from the freeing thread's heap, which
# keeps it: six decoding threads then held six images' worth however the gate
# serialized them (+944 MiB at a 0.5 GiB budget). Blocks above glibc's largest
# mmap threshold (32 MiB) are mapped and unmapped on their own: +402 MiB.
_PILLOW_BLOCK_BYTES: Final = 64 << 20


@dataclass(frozen=True)
class ImageLimits:
    """What an original may cost before it is refused."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int | None = None  # None: Pillow's limit (Image.MAX_IMAGE_PIXELS), warning band included
    # Estimated decoding memory of the images decoded at once (see DecodeGate);
    # one image estimated above it still decodes, alone.
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    # False (default): a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    # (Pillow's `draft`) when that still leaves at least 224x224, then resized:
    # faster and far less memory for large photos. True: every JPEG is decoded at
    # its full size and resized from there, the article's exact pixels (PNG and
    # WebP are always decoded at full size).
    full_size_jpeg_decode: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.max_decode_bytes < 1:
            raise ValueError(f"max_decode_bytes must be at least 1, got {self.max_decode_bytes}")


class DecodeGate:
    """Lets decodes run at once only while their estimated memory fits a budget.

    Decoding threads call `admit` with an image's cost, estimated from its header
    before any pixel is decoded (`decode_cost_bytes`). An image costing more than
    the whole budget waits until nothing else runs and then decodes alone, so no
    image is refused for the budget's sake. Waiters are admitted in arrival order:
    a large image is not starved by a stream of small ones.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise ValueError(f"decode budget must be at least 1 byte, got {budget_bytes}")
        # Process-wide, and harmless elsewhere: an image smaller than a block gets a block of its own size.
        Image.core.set_block_size(max(Image.core.get_block_size(), _PILLOW_BLOCK_BYTES))
        self.budget_bytes = budget_bytes
        self.peak_bytes = 0  # the most ever charged at once: never above the budget
        self.peak_decodes = 0  # the most decodes ever admitted at once
        self._charged = 0
        self._running = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @contextmanager
    def admit(self, cost_bytes: int) -> Iterator[None]:
        # Charged at most the whole budget: an oversized image then needs an
        # empty gate, and holds it alone while it decodes.
        charge = min(max(cost_bytes, 0), self.budget_bytes)
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: self._waiting[0] is ticket and self._charged + charge <= self.budget_bytes)
            self._waiting.popleft()
            self._charged += charge
            self._running += 1
            self.peak_bytes = max(self.peak_bytes, self._charged)
            self.peak_decodes = max(self.peak_decodes, self._running)
            self._changed.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._changed:
                self._charged -= charge
                self._running -= 1
                self._changed.notify_all()


def decode_cost_bytes(image: Image.Image) -> int:
    """Peak memory `downscale` needs for an opened (not yet decoded) image, from its header.

    Call after `draft` where one is made: it shrinks the size a JPEG is decoded
    at. Without it (full-size JPEG decode), the cost is that of the full size.
    """
    width, height = image.size
    per_pixel = _DECODE_BYTES_PER_PIXEL.get(image.mode, _DECODE_BYTES_PER_PIXEL_OTHER)
    if image.mode == "P" and "transparency" in image.info:
        per_pixel = _DECODE_BYTES_PER_PIXEL_OTHER  # composited through RGBA
    if image.format == "WEBP":
        per_pixel += _DECODE_BYTES_PER_PIXEL_WEBP_EXTRA
    return width * height * per_pixel + _DECODE_FIXED_BYTES


class ImageRejected(Exception):
    """An object that cannot become a thumbnail; `reason` is meant for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    width: int  # of the original image, as displayed (EXIF orientation applied)
    height: int


def image_id_from_key(key: str) -> str | None:
    """`a/b/img_0001.jpg` -> `img_0001`; None when the file name has no extension.

    The pattern is applied to the file name alone: on a whole key, a dot in a
    folder name (`a.b/c`) would otherwise yield an id for an extension-less file.
    """
    match = _IMAGE_ID_PATTERN.search(key.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def downscale(
    data: bytes, max_pixels: int | None = None, gate: DecodeGate | None = None, *, full_size_jpeg_decode: bool = False
) -> Thumbnail:
    """Decode an image, apply its orientation, make it RGB and resize it to 224x224.

    The aspect ratio is not kept, as in the article's pipeline. Whatever the
    bytes, the only exception raised is ImageRejected, with a reason a person
    can act on: any error Pillow (or numpy, littlecms) raises for one file
    becomes that file's rejection, naming the error, so that no file can fail a
    partition. With a `gate`, the decode waits until its estimated memory fits
    the gate's budget. `full_size_jpeg_decode`: see ImageLimits.

    MemoryError: the decode is tried once more alone (with a gate, once no other
    decode holds memory); if it fails again the image cannot be decoded on this
    machine, and it is rejected, saying so, rather than failing the partition
    at every retry.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        return _downscale_once(data, max_pixels, gate, full_size_jpeg_decode, alone=False)
    except MemoryError:
        pass  # retried below, once the failed attempt's frames (and its buffers) are gone
    try:
        return _downscale_once(data, max_pixels, gate, full_size_jpeg_decode, alone=True)
    except MemoryError as exc:
        raise ImageRejected(
            f"not enough memory to decode this image, even with no other decode running ({_named(exc)}); "
            "lower max_image_pixels to reject such images up front, or give the step more memory"
        ) from exc


def _downscale_once(
    data: bytes, max_pixels: int | None, gate: DecodeGate | None, full_size_jpeg_decode: bool, alone: bool
) -> Thumbnail:
    try:
        with _open_accepted(data) as image:
            _refuse_oversized(image, max_pixels)
            stored_size = image.size
            if not full_size_jpeg_decode:
                image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG only: decode at reduced scale
            # Estimated on the size that will be decoded (after any draft); `alone`
            # charges the whole budget, so nothing else decodes meanwhile.
            cost = gate.budget_bytes if gate is not None and alone else decode_cost_bytes(image)
            # Admitted before anything that may decode pixels: a PNG's getexif decodes the whole image.
            with gate.admit(cost) if gate is not None else _ungated():
                image.load()
                orientation = _exif_orientation(image)
                resized = _oriented_rgb_resized(image, orientation)
                # Its decoded pixels are freed before the gate lets the next decode in.
                image.close()
        width, height = stored_size
        if orientation in _ORIENTATIONS_SWAPPING_AXES:
            width, height = height, width
        return Thumbnail(jpeg=encode_jpeg(resized), width=width, height=height)
    except (ImageRejected, MemoryError):
        raise
    except Image.DecompressionBombError as exc:  # raised by Image.open past twice the limit
        raise ImageRejected(f"image too large to decode safely: {_named(exc)}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image data: {_named(exc)}") from exc
    except Exception as exc:  # any other decoder, plugin or conversion error: this file's, not the step's
        raise ImageRejected(f"image cannot be decoded: {_named(exc)}") from exc


def _named(exc: BaseException) -> str:
    """`OSError: image file is truncated`: the exception's type, then its message (shortened) if it has one."""
    try:
        message = " ".join(str(exc).split())
    except Exception:  # a message that cannot even be formatted
        message = ""
    if len(message) > _MAX_ERROR_MESSAGE_CHARS:
        message = message[: _MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@contextmanager
def _ungated() -> Iterator[None]:
    yield


def _oriented_rgb_resized(image: Image.Image, orientation: int) -> Image.Image:
    """The 224x224 RGB image; the full-size intermediates die when this returns."""
    method = _TRANSPOSE_BY_ORIENTATION.get(orientation)
    oriented = image.transpose(method) if method is not None else image
    return _to_rgb(oriented).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation of a loaded image, 1 when it has none.

    Metadata that cannot be parsed is ignored, as browsers ignore it: the image
    is shown as stored rather than rejected for a broken EXIF block.
    """
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return orientation if orientation in _TRANSPOSE_BY_ORIENTATION else 1
    except MemoryError:
        raise
    except Exception:
        return 1


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def decode_thumbnail(jpeg: bytes) -> np.ndarray:
    """A stored thumbnail as a (224, 224, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"thumbnail has shape {pixels.shape}, expected {(IMAGE_SIZE, IMAGE_SIZE, 3)}")
    return pixels


def refuse_oversized_file(size_bytes: int, limits: ImageLimits) -> None:
    """Checked on the listed size, before the object is downloaded, and again on what was read."""
    if size_bytes > limits.max_bytes:
        raise ImageRejected(
            f"file too large: {size_bytes} bytes exceeds the limit of {limits.max_bytes} bytes (max_image_bytes)"
        )


def _open_accepted(data: bytes) -> Image.Image:
    # Image.open preloads only a few plugins; WebP registers in init() (a no-op once done).
    Image.init()
    try:
        return Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except UnidentifiedImageError as exc:
        accepted_format = _accepted_signature(data)
        if accepted_format is not None:  # a damaged header, not another format
            raise ImageRejected(
                f"corrupt or truncated image data: starts as a {accepted_format} file but its header cannot be read "
                f"(content starts with {data[:16]!r})"
            ) from exc
        other_format = _other_image_format(data)
        if other_format is not None:
            raise ImageRejected(f"{other_format} image: only JPEG, PNG and WebP are accepted") from exc
        raise ImageRejected(f"not a JPEG, PNG or WebP image (content starts with {data[:8]!r})") from exc


def _accepted_signature(data: bytes) -> str | None:
    """The accepted format whose signature the content starts with, if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _other_image_format(data: bytes) -> str | None:
    """The format Pillow recognizes in a refused file (GIF, BMP, TIFF...), so the reason can name it."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only: no pixel is decoded
            return image.format
    except Exception:  # any plugin may raise anything while identifying: the file is refused all the same
        return None


def _refuse_oversized(image: Image.Image, max_pixels: int | None) -> None:
    # Checked on the header, before any pixel is allocated. Pillow only warns
    # between its limit and twice it; that band is refused here too, without
    # touching the process-wide warning filters (decoding runs in threads).
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageRejected(f"image too large: {width}x{height} pixels exceeds the limit of {limit}")


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours: composite them onto white
    # rather than dropping the alpha channel.
    image = _embedded_profile_to_srgb(_wide_gray_to_8_bit(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_gray_to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled onto 0-255 (65535 -> 255), not clipped at 255."""
    if image.mode not in _WIDE_GRAY_MODES:
        return image
    pixels = np.clip(np.asarray(image).astype(np.int64), 0, _SIXTEEN_BIT_MAX)
    scaled = (pixels * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _embedded_profile_to_srgb(image: Image.Image) -> Image.Image:
    """Colours of an image carrying an ICC profile (CMYK print profiles, Adobe RGB), converted to sRGB.

    Without a profile (or with one littlecms cannot use, whatever it raises)
    Pillow's own conversion applies: Adobe-inverted CMYK is already un-inverted
    by Pillow's decoder.
    """
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in _ICC_CONVERTIBLE_MODES:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except MemoryError:
        raise
    except Exception:  # a profile littlecms cannot use costs the colour correction, not the image
        return image
    return converted if converted is not None else image


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
