"""Contact sheets: bad objects get a grey "no preview" tile, the markdown decodes back and stays small. Objects are
read through the real local object store, so a deleted object fails as production's does (`ObjectMissing`)."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.imaging.contact_sheet import (
    GUTTER,
    LABEL_HEIGHT,
    MAX_NEIGHBOUR_ROWS,
    MAX_NEIGHBOURS_PER_ROW,
    MAX_REJECTED_TILES,
    MAX_SHEET_MARKDOWN_BYTES,
    NO_PREVIEW_GREY,
    REJECTED_COLUMNS,
    TILE_SIZE,
    Neighbour,
    NeighbourRow,
    RejectedObject,
    Tile,
    grid_size,
    markdown_bytes,
    neighbours_sheet,
    preview_image,
    rejected_images_sheet,
    sheet_markdown,
)
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.core.storage.objects import ObjectInfo

_RED = (220, 30, 30)
_GREEN = (30, 200, 60)
_BLUE = (30, 60, 220)
_COLOUR_TOLERANCE = 40  # JPEG at the sheet's quality shifts a flat colour by a few levels, never this much


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (224, 224), quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _noise_jpeg(seed: int, size: int) -> bytes:
    """The hardest content for JPEG: every pixel random, nothing for the encoder to save."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB, with a few bytes of pixel data: a decompression bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def _sheet_image(markdown: str) -> Image.Image:
    found = re.search(r"!\[[^\]]*\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert found is not None, markdown[:200]
    image = Image.open(io.BytesIO(base64.b64decode(found.group(1), validate=True)))
    image.load()
    return image


def _tile_corner_colour(sheet: Image.Image, index: int, columns: int) -> tuple[float, float, float]:
    """Mean colour of a patch near a tile's top-left corner, away from the "no preview" text in its middle."""
    left = GUTTER + (index % columns) * (TILE_SIZE + GUTTER)
    top = GUTTER + (index // columns) * (TILE_SIZE + LABEL_HEIGHT + GUTTER)
    patch = np.asarray(sheet.convert("RGB").crop((left + 4, top + 4, left + 16, top + 16)), dtype=np.float64)
    red, green, blue = patch.reshape(-1, 3).mean(axis=0)
    return red, green, blue


def _close(actual: tuple[float, float, float], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - e) <= _COLOUR_TOLERANCE for a, e in zip(actual, expected))


def _unescaped(cell: str) -> str:
    """A cell's text as the UI shows it: markdown backslash escapes removed."""
    return re.sub(r"\\(.)", r"\1", cell)


def _table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def _cells(table_line: str) -> list[str]:
    """A table row's cells, split as GFM does: on every `|` not escaped with a backslash."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", table_line)[1:-1]]


class _Store:
    """The real local object store over a folder holding `objects` (key -> bytes), listed as a manifest lists them.

    `read_bytes` is the store's own, counted: the reads the sheet made, in order.
    """

    def __init__(self, root: Path, objects: dict[str, bytes]) -> None:
        for key, data in objects.items():
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)
        self.store = LocalObjectStore(root)
        self.listed: dict[str, ObjectInfo] = {info.key: info for info in self.store.list_objects("")}
        assert sorted(self.listed) == sorted(objects)
        self.reads: list[str] = []

    def uri(self, key: str) -> str:
        return self.listed[key].uri

    def rejected(self, key: str, reason: str = "rejected", image_id: str | None = "x") -> RejectedObject:
        """The object as the rejected-images step hands it over: its listed URI and size."""
        return RejectedObject(
            image_id=image_id, uri=self.uri(key), reason=reason, size_bytes=self.listed[key].size_bytes
        )

    def read_bytes(self, uri: str) -> bytes:
        self.reads.append(uri)
        return self.store.read_bytes(uri)


def test_bad_objects_get_grey_tiles_and_good_ones_a_preview(tmp_path: Path) -> None:
    truncated = _jpeg(_GREEN, size=(600, 600))
    store = _Store(
        tmp_path,
        {
            "p/red.jpg": _jpeg(_RED),
            "p/notes.txt": b"this is not an image at all\n" * 10,
            "p/truncated.jpg": truncated[: len(truncated) // 2],
            "p/bomb.png": _png_declaring(40_000, 40_000),
            "p/gone.jpg": _jpeg(_GREEN),
            "p/blue.png": _jpeg(_BLUE),  # a JPEG under a .png name still previews
        },
    )
    rejected = [
        store.rejected("p/red.jpg", "too small"),
        store.rejected("p/notes.txt", "not an image"),
        store.rejected("p/truncated.jpg", "truncated"),
        store.rejected("p/bomb.png", "decompression bomb"),
        store.rejected("p/gone.jpg", "deleted", image_id="gone"),
        store.rejected("p/blue.png", "wrong extension"),
    ]
    (tmp_path / "p" / "gone.jpg").unlink()  # deleted after it was listed: reading it raises the store's error

    markdown = rejected_images_sheet(rejected, store.read_bytes)

    sheet = _sheet_image(markdown)
    assert sheet.size == grid_size(len(rejected), REJECTED_COLUMNS)
    colours = [_tile_corner_colour(sheet, index, REJECTED_COLUMNS) for index in range(len(rejected))]
    previewed = [not _close(colour, NO_PREVIEW_GREY) for colour in colours]
    assert previewed == [True, False, False, False, False, True]
    assert _close(colours[0], _RED) and _close(colours[5], _BLUE)
    notes = [_unescaped(_cells(line)[3]) for line in _table_lines(markdown)[2:]]
    assert notes[0] == "shown" and notes[5] == "shown"
    assert notes[4] == "read failed (ObjectMissing)"  # what the store raises for a deleted object
    assert notes[1] == notes[2] == notes[3] == "not a readable image"


def test_objects_over_the_fetch_limit_or_of_unknown_size_are_not_fetched(tmp_path: Path) -> None:
    small, large = _jpeg(_RED), _jpeg(_GREEN, size=(800, 800), quality=100)
    store = _Store(tmp_path, {"small.jpg": small, "large.jpg": large, "unknown.jpg": small})
    rejected = [
        store.rejected("small.jpg"),
        store.rejected("large.jpg"),
        RejectedObject(image_id="u", uri=store.uri("unknown.jpg"), reason="r", size_bytes=None),
    ]

    markdown = rejected_images_sheet(rejected, store.read_bytes, max_fetch_bytes=len(small))

    assert store.reads == [store.uri("small.jpg")]
    notes = [_unescaped(_cells(line)[3]) for line in _table_lines(markdown)[2:]]
    assert notes == ["shown", f"{len(large)} bytes: over the fetch limit", "size unknown: not fetched"]
    sheet = _sheet_image(markdown)
    assert not _close(_tile_corner_colour(sheet, 0, REJECTED_COLUMNS), NO_PREVIEW_GREY)
    assert _close(_tile_corner_colour(sheet, 1, REJECTED_COLUMNS), NO_PREVIEW_GREY)


def test_an_object_bigger_than_its_listed_size_is_not_previewed(tmp_path: Path) -> None:
    data = _jpeg(_RED)
    store = _Store(tmp_path, {"grown.jpg": data})
    stale = RejectedObject(image_id="g", uri=store.uri("grown.jpg"), reason="r", size_bytes=10)

    markdown = rejected_images_sheet([stale], store.read_bytes, max_fetch_bytes=100)

    assert _unescaped(_cells(_table_lines(markdown)[2])[3]) == f"{len(data)} bytes: over the fetch limit"


def test_preview_refuses_images_declaring_more_pixels_than_the_limit() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (1200, 1200), _RED).save(buffer, format="PNG")  # a valid PNG: only the limit stops it
    png = buffer.getvalue()

    assert preview_image(png, max_pixels=1_000_000) is None
    preview = preview_image(png, max_pixels=2_000_000)
    assert preview is not None and preview.size == (TILE_SIZE, TILE_SIZE)
    assert preview_image(_png_declaring(40_000, 40_000)) is None


def test_a_large_jpeg_is_decoded_at_reduced_scale_within_the_limit() -> None:
    big = _jpeg(_BLUE, size=(2400, 1600))  # 3.8 megapixels; drafted to 1/8 scale, 300x200

    preview = preview_image(big, max_pixels=100_000)

    assert preview is not None
    assert preview.size == (TILE_SIZE, TILE_SIZE * 2 // 3)


def test_transparent_images_are_flattened_onto_a_light_background() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (100, 100), (0, 0, 0, 0)).save(buffer, format="PNG")

    preview = preview_image(buffer.getvalue())

    assert preview is not None and preview.mode == "RGB"
    assert min(preview.getpixel((50, 50))) > 200  # not black, as a bare convert("RGB") would make it


def test_full_rejected_sheet_stays_within_the_byte_target(tmp_path: Path) -> None:
    # Worst case: noise at tile size (nothing for JPEG to save), and ids and reasons
    # long and full of characters that need escaping.
    store = _Store(tmp_path, {f"p/{i}.jpg": _noise_jpeg(i, TILE_SIZE) for i in range(MAX_REJECTED_TILES + 5)})
    rejected = [
        store.rejected(key, reason="[x](y) | `z`\n" * 30, image_id="|*_" * 40)
        for key in (f"p/{i}.jpg" for i in range(MAX_REJECTED_TILES + 5))
    ]

    markdown = rejected_images_sheet(rejected, store.read_bytes)

    assert markdown_bytes(markdown) <= MAX_SHEET_MARKDOWN_BYTES
    assert _sheet_image(markdown).size == grid_size(MAX_REJECTED_TILES, REJECTED_COLUMNS)
    assert len(_table_lines(markdown)) == 2 + MAX_REJECTED_TILES
    assert f"{MAX_REJECTED_TILES} of {len(rejected)} rejected objects shown" in markdown


def test_full_neighbours_sheet_stays_within_the_byte_target() -> None:
    rows = [
        NeighbourRow(
            image_id=f"query-{q}" * 10,
            jpeg=_noise_jpeg(100 + q, TILE_SIZE),
            neighbours=[
                Neighbour(f"n-{q}-{n}" * 10, _noise_jpeg(1000 * q + n, TILE_SIZE), 1.0 - n / 10)
                for n in range(MAX_NEIGHBOURS_PER_ROW + 2)
            ],
        )
        for q in range(MAX_NEIGHBOUR_ROWS + 2)
    ]

    markdown = neighbours_sheet(rows)

    assert markdown_bytes(markdown) <= MAX_SHEET_MARKDOWN_BYTES
    columns = 1 + MAX_NEIGHBOURS_PER_ROW
    sheet = _sheet_image(markdown)
    assert sheet.size == grid_size(MAX_NEIGHBOUR_ROWS * columns, columns)
    assert sheet.size == (
        columns * TILE_SIZE + (columns + 1) * GUTTER,
        MAX_NEIGHBOUR_ROWS * (TILE_SIZE + LABEL_HEIGHT) + (MAX_NEIGHBOUR_ROWS + 1) * GUTTER,
    )


def test_neighbours_sheet_puts_each_query_first_and_lists_similarities() -> None:
    rows = [
        NeighbourRow("a", _jpeg(_RED), [Neighbour("b", _jpeg(_GREEN), 0.98765), Neighbour("c", _jpeg(_BLUE), 0.5)]),
        NeighbourRow("d", _jpeg(_BLUE), [Neighbour("a", _jpeg(_RED), 0.25)]),  # fewer neighbours: cells left empty
    ]

    markdown = neighbours_sheet(rows)

    sheet = _sheet_image(markdown)
    assert sheet.size == grid_size(6, 3)
    expected = [_RED, _GREEN, _BLUE, _BLUE, _RED, None]
    for index, colour in enumerate(expected):
        actual = _tile_corner_colour(sheet, index, 3)
        assert _close(actual, colour if colour is not None else (255, 255, 255)), (index, actual)
    lines = _table_lines(markdown)
    assert [_unescaped(cell) for cell in _cells(lines[2])] == ["Q1", "a", "b (0.988)", "c (0.500)"]
    assert [_unescaped(cell) for cell in _cells(lines[3])] == ["Q2", "d", "a (0.250)", ""]


def test_pipes_and_newlines_in_ids_and_reasons_do_not_break_the_table(tmp_path: Path) -> None:
    nasty_id = "a|b\nc\r\nd\\|e"
    nasty_reason = "line one\nline | two\n\n| --- |"
    store = _Store(tmp_path, {"1.jpg": _jpeg(_RED)})
    rejected = [
        store.rejected("1.jpg", reason=nasty_reason, image_id=nasty_id),
        # never read (size unknown): only its URI is shown
        RejectedObject(image_id=None, uri="mem://no|id\n.bin", reason="no | id", size_bytes=None),
    ]

    markdown = rejected_images_sheet(rejected, store.read_bytes)

    table = markdown[markdown.index("\n| ") + 1 :].strip().splitlines()
    assert len(table) == 4  # header, separator, one line per object: no row was split
    assert all(len(_cells(line)) == 4 for line in table)
    first = _cells(table[2])
    assert first[1] == "a\\|b c  d\\\\\\|e"
    assert first[2] == "line one line \\| two  \\| \\-\\-\\- \\|"
    assert _cells(table[3])[1] == "\\(no id\\) mem\\:\\/\\/no\\|id \\.bin"


def test_sheet_markdown_lays_out_tiles_and_shrinks_quality_to_the_budget() -> None:
    tiles = [Tile(_noise_jpeg(i, TILE_SIZE), f"t{i}") for i in range(8)]

    roomy = sheet_markdown(tiles, columns=3)
    tight = sheet_markdown(tiles, columns=3, max_markdown_bytes=markdown_bytes(roomy) // 2)

    assert (
        _sheet_image(roomy).size
        == grid_size(8, 3)
        == (3 * TILE_SIZE + 4 * GUTTER, 3 * (TILE_SIZE + LABEL_HEIGHT) + 4 * GUTTER)
    )
    assert markdown_bytes(tight) <= markdown_bytes(roomy) // 2
    assert _sheet_image(tight).size == grid_size(8, 3)


def test_nothing_to_show_gives_markdown_without_an_image(tmp_path: Path) -> None:
    markdown = rejected_images_sheet([], _Store(tmp_path, {}).read_bytes)

    assert "data:image" not in markdown
    assert "nothing to show" in markdown


def test_columns_must_be_positive() -> None:
    with pytest.raises(ValueError, match="columns"):
        sheet_markdown([Tile(None, "x")], columns=0)
