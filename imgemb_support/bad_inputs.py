"""A corpus of the awkward and hostile files a real bucket holds, each with what must become of it.

Used by the image tests (one file at a time) and by the graph tests (all of
them in one partition, through every asset).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imgemb_assets.core.sample.dataset import SampleDataset

# The graph tests set `image_limits.max_image_bytes` to this, so that one
# ordinary (if noisy) PNG is over the limit without a 50 MiB fixture.
TEST_MAX_IMAGE_BYTES = 150_000


@dataclass(frozen=True)
class Case:
    file_name: str
    data: bytes
    reason_part: str | None  # in the rejection reason; None: it must become a thumbnail
    mean_rgb: tuple[int, int, int] | None = None  # the thumbnail's mean colour, where colour is the point


def bad_input_cases() -> list[Case]:
    rng = np.random.default_rng(7)
    jpeg = _encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), np.uint8)), "JPEG", quality=90)
    return [
        Case("zero_bytes.jpg", b"", "empty file"),
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated"),
        Case(
            "notes.jpg",
            b"remember to upload the real photo\n",
            "not a JPEG, PNG or WebP image (content starts with b'remember",
        ),
        Case(
            "error_page.jpg",
            b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
            "content starts with b'<!DOCTYP",
        ),
        Case(
            "animation.jpg", _encode(Image.new("P", (20, 20)), "GIF"), "GIF image: only JPEG, PNG and WebP are accepted"
        ),
        Case("scan.png", _encode(Image.new("RGB", (20, 20)), "BMP"), "BMP image: only JPEG, PNG and WebP are accepted"),
        Case(
            "cmyk_red.jpg",
            _encode(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG", quality=95),
            None,
            (255, 0, 0),
        ),
        Case("gray.jpg", _encode(Image.new("L", (120, 90), 77), "JPEG", quality=95), None, (77, 77, 77)),
        Case("palette.png", _encode(Image.new("RGB", (64, 64), (0, 0, 255)).convert("P"), "PNG"), None, (0, 0, 255)),
        Case("transparent.png", _encode(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG"), None, (255, 255, 255)),
        Case("half_transparent.png", _encode(Image.new("LA", (64, 64), (0, 128)), "PNG"), None, (127, 127, 127)),
        Case(
            "gray16.png", _encode(Image.fromarray(np.full((50, 60), 40_000, np.uint16)), "PNG"), None, (156, 156, 156)
        ),
        Case("rgb16.png", _png_rgb16(40, 30, (40_000, 1_000, 65_535)), None, (156, 4, 255)),
        Case("rotated.jpg", _rotated_jpeg(), None),
        Case("one_pixel.png", _encode(Image.new("RGB", (1, 1), (0, 255, 0)), "PNG"), None, (0, 255, 0)),
        Case(
            "photo.webp",
            _encode(Image.new("RGB", (80, 60), (200, 100, 50)), "WEBP", lossless=True),
            None,
            (200, 100, 50),
        ),
        Case(
            "too_big.png",
            _encode(Image.fromarray(rng.integers(0, 256, (250, 250, 3), np.uint8)), "PNG"),
            "file too large",
        ),
        # Headers claiming more pixels than Pillow's limit, with almost no data:
        # within its warning band, and past twice the limit (its hard error).
        Case("bomb_band.png", _png_header_only(10_000, 10_000), "image too large: 10000x10000 pixels"),
        Case("bomb.png", _png_header_only(50_000, 50_000), "image too large to decode safely"),
        Case("no_extension", jpeg, "no extension"),
        Case("twin.jpg", jpeg, None),
        Case("twin.png", _encode(Image.new("RGB", (32, 32), (9, 9, 9)), "PNG"), "duplicate image_id 'twin'"),
    ]


CORPUS_PREFIX = "bad-inputs"


def accepted_image_ids(cases: list[Case]) -> list[str]:
    return sorted(case.file_name.rsplit(".", 1)[0] for case in cases if case.reason_part is None)


def write_corpus_dataset(root: Path) -> SampleDataset:
    """The corpus as one partition of a raw-images root, with a sales export covering every accepted image."""
    cases = bad_input_cases()
    write_cases(root / "raw-images" / CORPUS_PREFIX, cases)
    sales_ids = [*accepted_image_ids(cases), "sold_but_never_photographed"]
    (root / "sales").mkdir(parents=True)
    pq.write_table(
        pa.table({"image_id": sales_ids, "sales": [float(i) for i in range(len(sales_ids))]}),
        root / "sales" / "sales.parquet",
    )
    return SampleDataset(
        root=str(root),
        raw_images_uri=str(root / "raw-images"),
        sales_uri=str(root / "sales"),
        prefixes=[CORPUS_PREFIX],
        image_ids={CORPUS_PREFIX: accepted_image_ids(cases)},
        broken_files={CORPUS_PREFIX: sorted(case.file_name for case in cases if case.reason_part is not None)},
        sales_image_ids=sales_ids,
    )


def write_cases(folder: Path, cases: list[Case]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / case.file_name).write_bytes(case.data)


def _encode(image: Image.Image, format_name: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **params)
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    """A 200x100 JPEG whose EXIF orientation (6) says it is displayed 100x200."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.new("RGB", (200, 100), (10, 200, 10)), "JPEG", exif=exif.tobytes())


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_rgb16(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">" + "H" * 3 * width, *(rgb * width))
    return _png(width, height, 16, 2, zlib.compress(row * height))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny file whose header claims width x height 8-bit gray pixels."""
    return _png(width, height, 8, 0, zlib.compress(b"\x00" * 1024))
