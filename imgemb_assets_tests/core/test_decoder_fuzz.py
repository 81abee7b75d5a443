"""Any bytes become a thumbnail or a rejection: `downscale` fuzzed with files Pillow can write and mutated images.

Two parts, both deterministic:

- a seeded corpus (numpy's RNG, seed fixed): valid files of every format
  Pillow can write here (all refused by content, except JPEG/PNG/WebP/MPO),
  then bit flips, truncations, byte runs, marker/chunk corruption and header
  size fields set huge or zero on JPEG, PNG and WebP (chunk CRCs recomputed so
  the corruption reaches the decoder) and on some of the other formats (their
  detection path names the format), garbage EXIF and ICC blocks;
- hypothesis (derandomized, a bounded number of examples) composing the same
  mutations on the same seeds, so a failure shrinks to a small reproducer.

Each input must give a Thumbnail whose JPEG decodes to 224x224 RGB, or an
ImageRejected with a non-empty reason; anything else fails the test with the
input's description. Before `downscale` turned every error into a rejection,
14 of the seeded corpus's 2,733 inputs escaped it: struct.error and
AttributeError from ImageOps.exif_transpose re-serializing odd EXIF blocks, and
NotImplementedError from Pillow's DDS plugin while naming a refused file's
format (AVIF's RuntimeError and SPIDER's AttributeError turned up in longer runs).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, features

from imgemb_assets.core.imaging.images import DecodeGate, ImageRejected, Thumbnail, decode_thumbnail, downscale

SEED = 20261207
# Large enough for the fuzz to reach the pixel-limit refusal, small enough that
# a mutated header claiming many pixels is refused before a big allocation.
FUZZ_MAX_PIXELS = 1 << 22
MUTANTS_PER_SEED = 40
OTHER_FORMAT_MUTANTS = 40
ODD_EXIF_JPEGS = 150
HYPOTHESIS_EXAMPLES = 250

Mutation = Callable[[bytes, np.random.Generator], bytes]


# --- seeds ---------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, not like pure noise or a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@cache
def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "fuzz camera"
    return exif.tobytes()


@cache
def accepted_seeds() -> dict[str, bytes]:
    """Valid JPEG, PNG and WebP files of the shapes a bucket holds: the mutations' starting points."""
    photo = _photo(96, 72)
    seeds = {
        "jpeg": _encode(photo, "JPEG", quality=85),
        "jpeg_large": _encode(_photo(520, 470, seed=1), "JPEG", quality=80),  # drafted at 1/2 scale
        "jpeg_progressive": _encode(photo, "JPEG", quality=85, progressive=True),
        "jpeg_exif_icc": _encode(photo, "JPEG", quality=85, exif=_exif(6), icc_profile=_srgb_icc()),
        "jpeg_gray": _encode(photo.convert("L"), "JPEG", quality=85),
        "jpeg_cmyk": _encode(photo.convert("CMYK"), "JPEG", quality=85),
        "jpeg_444_restart": _encode(photo, "JPEG", quality=90, subsampling=0, restart_marker_blocks=1),
        "png": _encode(photo, "PNG"),
        "png_rgba_exif": _encode(photo.convert("RGBA"), "PNG", exif=_exif(8)),
        "png_palette_trns": _encode(photo.convert("P"), "PNG", transparency=3),
        "png_gray16": _encode(Image.fromarray((np.arange(48 * 40, dtype=np.uint16) * 31).reshape(40, 48)), "PNG"),
        "png_icc": _encode(photo, "PNG", optimize=False, icc_profile=_srgb_icc()),
        "png_1bit": _encode(photo.convert("1"), "PNG"),
        "webp_lossy": _encode(photo, "WEBP", quality=80),
        "webp_lossless_rgba": _encode(photo.convert("RGBA"), "WEBP", lossless=True),
        "webp_exif": _encode(photo, "WEBP", quality=80, exif=_exif(3)),
    }
    # Interlaced PNG: Pillow writes no Adam7, so set the IHDR flag on a tiny image's chunk by hand.
    seeds["png_interlace_flag"] = _with_png_chunk(seeds["png_1bit"], b"IHDR", lambda body: body[:12] + b"\x01")
    return seeds


# (format, mode, size, save parameters): whatever this Pillow can write, in a few modes.
_OTHER_FORMATS: list[tuple[str, str, tuple[int, int], dict[str, object]]] = [
    ("GIF", "P", (40, 30), {}),
    ("GIF", "RGB", (40, 30), {"save_all": True, "append_images": [Image.new("RGB", (40, 30), "red")]}),
    ("BMP", "RGB", (40, 30), {}),
    ("BMP", "1", (40, 30), {}),
    ("BMP", "RGBA", (40, 30), {}),
    ("DIB", "RGB", (40, 30), {}),
    ("TIFF", "RGB", (40, 30), {}),
    ("TIFF", "I;16", (40, 30), {}),
    ("TIFF", "CMYK", (40, 30), {"compression": "tiff_lzw"}),
    ("TIFF", "RGB", (40, 30), {"compression": "jpeg"}),
    ("TIFF", "F", (40, 30), {}),
    ("ICO", "RGBA", (32, 32), {}),
    ("ICNS", "RGBA", (32, 32), {}),
    ("PPM", "RGB", (40, 30), {}),
    ("PPM", "L", (40, 30), {}),
    ("PPM", "I;16", (40, 30), {}),
    ("TGA", "RGB", (40, 30), {}),
    ("TGA", "RGBA", (40, 30), {"compression": "tga_rle"}),
    ("PCX", "RGB", (40, 30), {}),
    ("PCX", "P", (40, 30), {}),
    ("EPS", "RGB", (40, 30), {}),
    ("PDF", "RGB", (40, 30), {}),
    ("JPEG2000", "RGB", (40, 30), {}),
    ("JPEG2000", "RGB", (40, 30), {"no_jp2": True}),  # a raw codestream
    ("AVIF", "RGB", (40, 30), {}),
    ("MPO", "RGB", (40, 30), {"save_all": True, "append_images": [Image.new("RGB", (40, 30), "blue")]}),
    ("QOI", "RGBA", (40, 30), {}),
    ("DDS", "RGBA", (32, 32), {}),
    ("DDS", "RGB", (32, 32), {"pixel_format": "DXT1"}),
    ("SGI", "RGB", (40, 30), {}),
    ("SPIDER", "F", (40, 30), {}),
    ("IM", "RGB", (40, 30), {}),
    ("MSP", "1", (40, 30), {}),
    ("PALM", "1", (40, 30), {}),
    ("XBM", "1", (40, 30), {}),
    ("BLP", "P", (32, 32), {}),
    ("BLP", "RGBA", (32, 32), {"blp_version": "BLP2"}),
]


@cache
def other_format_files() -> dict[str, bytes]:
    """Valid files of the formats Pillow writes here, made at test time (one this build cannot write is skipped)."""
    Image.init()
    made = {}
    for fmt, mode, size, params in _OTHER_FORMATS:
        if fmt not in Image.SAVE or (fmt == "JPEG2000" and not features.check("jpg_2000")):
            continue
        try:
            gray = mode in ("I;16", "F")
            image = _photo(*size).convert("L").convert(mode) if gray else _photo(*size).convert(mode)
            made[f"{fmt.lower()}_{mode.lower().replace(';', '')}_{len(made)}"] = _encode(image, fmt, **params)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a writer this build lacks (or a mode it refuses)
    # Formats Pillow reads but does not write, by hand: headers other plugins identify.
    made["eps_like"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\n%%EndComments\nshowpage\n%%EOF\n"
    made["eps_binary_header"] = b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, 60, 0, 0, 0, 0) + made["eps_like"]
    made["psd_header"] = b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 30, 40, 8, 3) + bytes(12)
    made["fits_header"] = (
        b"SIMPLE  =                    T".ljust(80)
        + b"BITPIX  =                    8".ljust(80)
        + b"NAXIS   =                    0".ljust(80)
        + b"END".ljust(80)
    ).ljust(2880)
    made["xpm"] = b'/* XPM */\nstatic char *x[] = {\n"2 1 1 1",\n"a c #ff0000",\n"aa"\n};\n'
    made["sun_header"] = struct.pack(">8I", 0x59A66A95, 40, 30, 24, 3600, 1, 0, 0) + bytes(3600)
    made["ftex_header"] = b"FTEX" + struct.pack("<7I", 0x4E, 40, 30, 1, 1, 0, 1) + bytes(64)
    made["gbr_header"] = struct.pack(">7I", 28, 2, 4, 4, 1, 0x47494D50, 0) + bytes(16)
    made["html"] = b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"
    made["zip"] = b"PK\x03\x04" + bytes(26) + b"photo.jpg"
    return made


# --- mutations ---------------------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, body) of each complete chunk after the signature."""
    chunks, at = [], 8
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        if at + 12 + length > len(data):
            break
        chunks.append((at, data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _with_png_chunk(data: bytes, kind: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """The PNG with the first `kind` chunk's body changed, its length and CRC recomputed."""
    for at, found, body in _png_chunks(data):
        if found == kind:
            return data[:at] + _png_chunk(kind, change(body)) + data[at + 12 + len(body) :]
    return data


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the length field, segment length) of the segments before the scan."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        segments.append((marker, at + 2, length))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        at += 2 + length
    return segments


def _pick(rng: np.random.Generator, options: list[bytes]) -> bytes:
    # Not rng.choice: numpy would turn the byte strings into an array and strip their trailing NULs.
    return options[int(rng.integers(0, len(options)))]


def _huge(rng: np.random.Generator, bits: int) -> int:
    return [0, 1, (1 << bits) - 1, 1 << (bits - 1), int(rng.integers(0, 1 << bits))][int(rng.integers(0, 5))]


def bit_flips(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        at = int(rng.integers(0, len(out)))
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def header_bit_flips(data: bytes, rng: np.random.Generator) -> bytes:
    """Flips within the first 64 bytes, where the headers are."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(0, min(64, len(out))))
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def byte_run(data: bytes, rng: np.random.Generator) -> bytes:
    """A run of 0x00, 0xFF or random bytes written over the data."""
    out = bytearray(data)
    at = int(rng.integers(0, len(out)))
    length = int(rng.integers(1, 64))
    fill = _pick(rng, [b"\x00", b"\xff", b""])
    run = fill * length if fill else rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    out[at : at + length] = run
    return bytes(out)


def splice(data: bytes, rng: np.random.Generator) -> bytes:
    """A span deleted, duplicated or moved."""
    a, b = sorted(int(v) for v in rng.integers(0, len(data), 2))
    choice = int(rng.integers(0, 3))
    if choice == 0:
        return data[:a] + data[b:]
    if choice == 1:
        return data[:b] + data[a:b] + data[b:]
    return data[:a] + data[b:] + data[a:b]


def other_magic(data: bytes, rng: np.random.Generator) -> bytes:
    """Another format's first bytes over (or before) this file's."""
    magic = _pick(
        rng,
        [
            b"GIF89a",
            b"BM",
            b"II*\x00",
            b"MM\x00*",
            b"\x00\x00\x01\x00",
            b"P6\n",
            b"8BPS",
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff",
            b"RIFF\x00\x00\x00\x00WEBP",
            b"\x00\x00\x00\x0cjP  \r\n\x87\n",
            b"%!PS-Adobe-3.0",
            b"\xc5\xd0\xd3\xc6",
            b"DDS ",
            b"qoif",
            b"SIMPLE  =",
            b"\x0a\x05\x01\x08",
            b"icns",
        ],
    )
    return magic + data if rng.random() < 0.5 else magic + data[len(magic) :]


def jpeg_sof_size(data: bytes, rng: np.random.Generator) -> bytes:
    """The frame header's height and width set to 0, 1, 65535 or anything."""
    out = bytearray(data)
    for marker, at, _ in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            out[at + 3 : at + 7] = struct.pack(">HH", _huge(rng, 16), _huge(rng, 16))
            break
    return bytes(out)


def jpeg_segment_body(data: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes inside one header segment (quantization, Huffman, frame, scan or APP tables)."""
    segments = _jpeg_segments(data)
    if not segments:
        return bit_flips(data, rng)
    _, at, length = segments[int(rng.integers(0, len(segments)))]
    out = bytearray(data)
    end = min(at + length, len(out))  # the segment, as far as the (maybe cut) data holds it
    for _ in range(int(rng.integers(1, 6))):
        if end > at + 2:
            out[int(rng.integers(at + 2, end))] = int(rng.integers(0, 256))
    return bytes(out)


def jpeg_segment_length(data: bytes, rng: np.random.Generator) -> bytes:
    segments = _jpeg_segments(data)
    if not segments:
        return bit_flips(data, rng)
    _, at, _ = segments[int(rng.integers(0, len(segments)))]
    return data[:at] + struct.pack(">H", _huge(rng, 16)) + data[at + 2 :]


def jpeg_garbage_app(data: bytes, rng: np.random.Generator) -> bytes:
    """An EXIF (with or without a TIFF header), ICC or Adobe segment of random bytes, after SOI."""
    noise = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    body = _pick(
        rng,
        [
            b"Exif\x00\x00" + noise,
            b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + noise,
            b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + noise,
            b"ICC_PROFILE\x00\x01\x01" + noise,
            b"ICC_PROFILE\x00\x01\x01" + bit_flips(_srgb_icc(), rng),
            b"Adobe" + noise,
            b"MPF\x00" + noise,
        ],
    )
    marker = b"\xff\xe1"  # APP1: EXIF
    if body.startswith((b"ICC", b"MPF")):
        marker = b"\xff\xe2"
    elif body.startswith(b"Adobe"):
        marker = b"\xff\xee"
    return data[:2] + marker + struct.pack(">H", len(body) + 2) + body + data[2:]


def jpeg_odd_exif(data: bytes, rng: np.random.Generator) -> bytes:
    """An EXIF block with an orientation and tags of odd types, counts and offsets, after SOI.

    Pillow reads such blocks, but ImageOps.exif_transpose failed re-serializing
    some of them (struct.error, AttributeError) before `downscale` stopped using it.
    """
    entries = [struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", int(rng.integers(1, 9)), 0)]
    for _ in range(int(rng.integers(1, 4))):
        tag = [0x8769, 0x8825, 0xA005, 0x927C, 0x010F, 0x9286, 0x0132, int(rng.integers(0, 1 << 16))][
            int(rng.integers(0, 8))
        ]
        count = [0, 1, 2, 4, 0xFFFF, int(rng.integers(0, 1 << 32))][int(rng.integers(0, 6))]
        entries.append(struct.pack("<HHI", tag, int(rng.integers(0, 14)), count) + rng.bytes(4))
    ifd = b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + ifd + rng.bytes(int(rng.integers(0, 48)))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


def jpeg_scan_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes (markers included) in the entropy-coded data."""
    segments = _jpeg_segments(data)
    start = segments[-1][1] + segments[-1][2] if segments else 2
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 12))):
        if start < len(out) - 2:
            value = [0xFF, 0x00, int(rng.integers(0, 256))][int(rng.integers(0, 3))]
            out[int(rng.integers(start, len(out) - 2))] = value
    return bytes(out)


def png_ihdr(data: bytes, rng: np.random.Generator) -> bytes:
    """IHDR width/height set huge or zero, or bit depth, colour type, interlace set to anything (CRC fixed)."""

    def change(body: bytes) -> bytes:
        fields = bytearray(body.ljust(13, b"\x00"))  # an earlier mutation may have shortened it
        pick = int(rng.integers(0, 3))
        if pick == 0:
            fields[0:8] = struct.pack(">II", _huge(rng, 31), _huge(rng, 31))
        elif pick == 1:
            fields[0:8] = struct.pack(">II", int(rng.integers(1, 5000)), int(rng.integers(1, 5000)))
        else:
            fields[8 + int(rng.integers(0, 5))] = [0, 1, 2, 3, 4, 6, 8, 16, 255][int(rng.integers(0, 9))]
        return bytes(fields)

    return _with_png_chunk(data, b"IHDR", change)


def png_chunk_body(data: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes in one chunk's body, its CRC recomputed so the decoder sees them."""
    chunks = _png_chunks(data)
    if not chunks:
        return bit_flips(data, rng)
    at, kind, body = chunks[int(rng.integers(0, len(chunks)))]
    if not body:
        return bit_flips(data, rng)
    changed = bytearray(body)
    for _ in range(int(rng.integers(1, 6))):
        changed[int(rng.integers(0, len(changed)))] = int(rng.integers(0, 256))
    return data[:at] + _png_chunk(kind, bytes(changed)) + data[at + 12 + len(body) :]


def png_chunk_length(data: bytes, rng: np.random.Generator) -> bytes:
    chunks = _png_chunks(data)
    if not chunks:
        return bit_flips(data, rng)
    at, _, _ = chunks[int(rng.integers(0, len(chunks)))]
    return data[:at] + struct.pack(">I", _huge(rng, 32)) + data[at + 4 :]


def png_extra_chunk(data: bytes, rng: np.random.Generator) -> bytes:
    """A chunk of odd content after IHDR: broken ICC, EXIF, transparency, palette, text, animation."""
    noise = rng.integers(0, 256, int(rng.integers(0, 120)), dtype=np.uint8).tobytes()
    kind, body = [
        (b"iCCP", b"icc\x00\x00" + zlib.compress(noise)),
        (b"iCCP", b"icc\x00\x00" + zlib.compress(bit_flips(_srgb_icc(), rng))),
        (b"iCCP", b"icc\x00\x00" + noise),
        (b"eXIf", noise),
        (b"eXIf", b"II*\x00\x08\x00\x00\x00" + noise),
        (b"tRNS", noise),
        (b"PLTE", noise),
        (b"zTXt", b"k\x00\x00" + noise),
        (b"iTXt", b"k\x00\x01\x00\x00\x00" + noise),
        (b"acTL", struct.pack(">II", _huge(rng, 32), 0)),
        (b"fcTL", noise),
        (b"sBIT", noise),
        (b"gAMA", noise),
        (b"pHYs", noise),
    ][int(rng.integers(0, 14))]
    chunks = _png_chunks(data)
    if not chunks:
        return data + _png_chunk(kind, body)
    at = chunks[0][0] + 12 + len(chunks[0][2])
    return data[:at] + _png_chunk(kind, body) + data[at:]


def png_idat_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes in the compressed pixels, CRC fixed: zlib or filter errors, or wrong pixels."""

    def change(body: bytes) -> bytes:
        changed = bytearray(body)
        for _ in range(int(rng.integers(1, 8))):
            if changed:
                changed[int(rng.integers(0, len(changed)))] = int(rng.integers(0, 256))
        return bytes(changed)

    return _with_png_chunk(data, b"IDAT", change)


def webp_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """The RIFF or chunk size, the VP8X canvas, or a VP8/VP8L frame's dimensions set to anything."""
    out = bytearray(data)
    pick = int(rng.integers(0, 4))
    if pick == 0:
        out[4:8] = struct.pack("<I", _huge(rng, 32))
    elif pick == 1 and len(out) >= 20:
        out[16:20] = struct.pack("<I", _huge(rng, 32))
    elif pick == 2 and out[12:16] == b"VP8X" and len(out) >= 30:
        out[24:27] = _huge(rng, 24).to_bytes(3, "little")
        out[27:30] = _huge(rng, 24).to_bytes(3, "little")
    elif out[12:16] == b"VP8 " and len(out) >= 30:
        out[26:30] = struct.pack("<HH", _huge(rng, 14), _huge(rng, 14))
    elif out[12:16] == b"VP8L" and len(out) >= 25:
        out[21:25] = struct.pack("<I", _huge(rng, 32))
    else:
        return header_bit_flips(data, rng)
    return bytes(out)


def webp_vp8x_flags(data: bytes, rng: np.random.Generator) -> bytes:
    """An extended header (VP8X) claiming animation, ICC, EXIF or alpha chunks the file may not hold."""
    width, height = 96, 72
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([int(rng.integers(0, 256))]) + bytes(3)
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    noise = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
    sized = struct.pack("<I", len(noise)) + noise
    extra = _pick(rng, [b"", b"ICCP" + sized, b"EXIF" + sized, b"ANIM" + struct.pack("<I", 6) + bytes(6)])
    if len(noise) % 2:
        extra += b"\x00" if extra else b""
    body = b"WEBP" + vp8x + extra + data[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def dds_pixel_format(data: bytes, rng: np.random.Generator) -> bytes:
    """The DDS pixel format's flags and FourCC set to anything: Pillow raised NotImplementedError identifying some."""
    if len(data) < 88:
        return bit_flips(data, rng)
    flags = [0x0, 0x4, 0x40, 0x41, 0x20000, int(rng.integers(0, 1 << 32))][int(rng.integers(0, 6))]
    fourcc = [b"DXT1", b"DXT5", b"DX10", b"ATI2", b"ZZZZ", rng.bytes(4)][int(rng.integers(0, 6))]
    return data[:80] + struct.pack("<I", flags) + fourcc + data[88:]


GENERIC: list[Mutation] = [bit_flips, header_bit_flips, truncate, byte_run, splice, other_magic]
BY_FORMAT: dict[str, list[Mutation]] = {
    "jpeg": [jpeg_sof_size, jpeg_segment_body, jpeg_segment_length, jpeg_garbage_app, jpeg_odd_exif, jpeg_scan_bytes],
    "png": [png_ihdr, png_chunk_body, png_chunk_length, png_extra_chunk, png_idat_bytes],
    "webp": [webp_fields, webp_vp8x_flags],
    "dds": [dds_pixel_format],
}


def mutations_for(name: str) -> list[Mutation]:
    return GENERIC + BY_FORMAT.get(name.split("_")[0], [])


def mutate(mutation: Mutation, data: bytes, rng: np.random.Generator) -> bytes:
    """The mutation applied; data too short to mutate (an earlier step may have cut it) is kept."""
    return mutation(data, rng) if len(data) >= 2 else data


def seeded_inputs() -> Iterator[tuple[str, bytes]]:
    """(description, bytes) of every input of the seeded corpus, the same on every run."""
    rng = np.random.default_rng(SEED)
    yield from ((f"valid {name}", data) for name, data in other_format_files().items())
    yield from ((f"valid {name}", data) for name, data in accepted_seeds().items())
    for i in range(ODD_EXIF_JPEGS):
        yield f"jpeg odd exif #{i}", jpeg_odd_exif(accepted_seeds()["jpeg"], rng)
    for name, data in accepted_seeds().items():
        mutations = mutations_for(name)
        for i in range(MUTANTS_PER_SEED):
            mutated = data
            applied = []
            for _ in range(1 if i < MUTANTS_PER_SEED // 2 else 2):  # half once, half twice
                mutation = mutations[int(rng.integers(0, len(mutations)))]
                mutated = mutate(mutation, mutated, rng)
                applied.append(mutation.__name__)
            yield f"{name} #{i} {'+'.join(applied)}", mutated
    # The detection path: other plugins on broken files. DDS (NotImplementedError), AVIF
    # (RuntimeError) and SPIDER (AttributeError) raised there, escaping `downscale`.
    for name, data in other_format_files().items():
        mutations = mutations_for(name)
        for i in range(OTHER_FORMAT_MUTANTS):
            mutation = mutations[int(rng.integers(0, len(mutations)))]
            yield f"{name} #{i} {mutation.__name__}", mutate(mutation, data, rng)


# --- the property --------------------------------------------------------------------------------------------------


def outcome(data: bytes, max_pixels: int | None = FUZZ_MAX_PIXELS, gate: DecodeGate | None = None) -> str:
    """'thumbnail' or 'rejected: <reason>'; raises AssertionError naming anything else."""
    try:
        thumbnail = downscale(data, max_pixels, gate)
    except ImageRejected as rejected:
        assert isinstance(rejected.reason, str) and rejected.reason.strip(), "rejected without a reason"
        return f"rejected: {rejected.reason}"
    except Exception as exc:  # the point of the test
        raise AssertionError(f"downscale raised {type(exc).__name__}: {exc}") from exc
    assert isinstance(thumbnail, Thumbnail)
    assert thumbnail.width >= 1 and thumbnail.height >= 1
    assert decode_thumbnail(thumbnail.jpeg).shape == (224, 224, 3)
    return "thumbnail"


@pytest.mark.filterwarnings("ignore")  # Pillow warns about some broken files (corrupt EXIF, bomb band) before refusing
def test_seeded_corpus_gives_only_thumbnails_or_rejections() -> None:
    gate = DecodeGate(64 << 20)
    failures, counts = [], {"thumbnail": 0, "rejected": 0}
    for index, (description, data) in enumerate(seeded_inputs()):
        try:
            # Every tenth input under the default (Pillow's) pixel limit and through a gate, as the step runs it.
            result = outcome(data, None, gate) if index % 10 == 0 else outcome(data)
        except AssertionError as failure:
            failures.append(f"{description}: {failure}")
            continue
        counts[result.split(":")[0]] += 1
    assert not failures, f"{len(failures)} inputs broke downscale:\n" + "\n".join(failures[:20])
    # The corpus reaches both outcomes in numbers (a generator that only made garbage would prove little).
    assert counts["thumbnail"] > 100 and counts["rejected"] > 300, counts


@pytest.mark.filterwarnings("ignore")  # the IM plugin is deprecated, and says so while identifying
def test_other_formats_are_refused_by_name() -> None:
    """Valid files of formats Pillow writes: refused by content and named, except JPEG's multi-picture variant."""
    for name, data in other_format_files().items():
        result = outcome(data)
        if name.startswith("mpo"):
            assert result == "thumbnail"  # an MPO file is a JPEG with more pictures after the first
        else:
            assert result.startswith("rejected"), name
    result = outcome(other_format_files()["gif_p_0"])
    assert "GIF image: only JPEG, PNG and WebP are accepted" in result


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    seed_name=st.sampled_from(sorted(accepted_seeds())),
    steps=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 2**32 - 1)), min_size=1, max_size=3),
)
@pytest.mark.filterwarnings("ignore")
def test_mutated_images_give_only_thumbnails_or_rejections(seed_name: str, steps: list[tuple[int, int]]) -> None:
    data = accepted_seeds()[seed_name]
    mutations = mutations_for(seed_name)
    for pick, seed in steps:
        data = mutate(mutations[pick % len(mutations)], data, np.random.default_rng(seed))
    outcome(data)
