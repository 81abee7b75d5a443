"""Decoding, orienting, converting and downscaling images, and naming why one cannot be used."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

IMAGE_SIZE: Final = 224
# Decoding is by content: a file named .jpg that holds anything else is refused.
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP")
# Thumbnails are stored as JPEG; high quality and no chroma subsampling keep the
# stored pixels close to the resized image the model would have seen in memory.
THUMBNAIL_JPEG_QUALITY: Final = 95
# The article's rule: the file name without its extension.
_IMAGE_ID_PATTERN: Final = re.compile(r"([^/]+)\.[^.]+$")
_EXIF_ORIENTATION_TAG: Final = 0x0112
_ORIENTATIONS_SWAPPING_AXES: Final = frozenset({5, 6, 7, 8})
# Single-channel modes holding more than 8 bits per pixel (16-bit PNGs open as
# I;16); convert("RGB") would clip them at 255 instead of scaling them.
_WIDE_GRAY_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_SIXTEEN_BIT_MAX: Final = 65535
# Modes whose embedded ICC profile is honoured when converting to sRGB.
_ICC_CONVERTIBLE_MODES: Final = frozenset({"RGB", "CMYK"})


# Originals larger than this are not downloaded: 50 MiB is several times a
# full-resolution camera JPEG.
DEFAULT_MAX_IMAGE_BYTES: Final = 50 << 20


@dataclass(frozen=True)
class ImageLimits:
    """What an original may cost before it is refused."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int | None = None  # None: Pillow's limit (Image.MAX_IMAGE_PIXELS), warning band included

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, got {self.max_pixels}")


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


def downscale(data: bytes, max_pixels: int | None = None) -> Thumbnail:
    """Decode an image, apply its orientation, make it RGB and resize it to 224x224.

    The aspect ratio is not kept, as in the article's pipeline. Raises
    ImageRejected with a reason a person can act on.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        image = _open_accepted(data)
        _refuse_oversized(image, max_pixels)
        width, height = _displayed_size(image)
        image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG only: decode at reduced scale
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        resized = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:  # raised by Image.open past twice the limit
        raise ImageRejected(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image data: {exc}") from exc
    return Thumbnail(jpeg=encode_jpeg(resized), width=width, height=height)


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
        other_format = _other_image_format(data)
        if other_format is not None:
            raise ImageRejected(f"{other_format} image: only JPEG, PNG and WebP are accepted") from exc
        raise ImageRejected(f"not a JPEG, PNG or WebP image (content starts with {data[:8]!r})") from exc


def _other_image_format(data: bytes) -> str | None:
    """The format Pillow recognizes in a refused file (GIF, BMP, TIFF...), so the reason can name it."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only: no pixel is decoded
            return image.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def _refuse_oversized(image: Image.Image, max_pixels: int | None) -> None:
    # Checked on the header, before any pixel is allocated. Pillow only warns
    # between its limit and twice it; that band is refused here too, without
    # touching the process-wide warning filters (decoding runs in threads).
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageRejected(f"image too large: {width}x{height} pixels exceeds the limit of {limit}")


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    if image.getexif().get(_EXIF_ORIENTATION_TAG) in _ORIENTATIONS_SWAPPING_AXES:
        return height, width
    return width, height


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

    Without a profile (or with one littlecms cannot use) Pillow's own conversion
    applies: Adobe-inverted CMYK is already un-inverted by Pillow's decoder.
    """
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in _ICC_CONVERTIBLE_MODES:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    return converted if converted is not None else image


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
