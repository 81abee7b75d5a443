"""Decoding, orienting, converting and downscaling images, and naming why one cannot be used."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def _open_accepted(data: bytes) -> Image.Image:
    # Image.open preloads only a few plugins; WebP registers in init() (a no-op once done).
    Image.init()
    try:
        return Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            f"not a JPEG, PNG or WebP image (content starts with {data[:8]!r})"
        ) from exc


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
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
