"""Contact sheets: small grids of image tiles, as markdown a person can look at in the Dagster UI.

The Dagster UI renders markdown metadata and (since dagster PR #13443) base64
`data:image/...` images inside it, so a sheet is one JPEG embedded in markdown,
followed by a table with the text that is too small to read inside a tiny JPEG.
Every sheet lands in Dagster's event log, so each is kept to a byte budget.

Two builders sit on the grid: rejected objects with their reasons (previews are
made from untrusted bytes, so decoding is bounded and every failure becomes a grey
"no preview" tile), and query thumbnails next to their nearest neighbours.

The caller wraps the returned markdown in `MetadataValue.md`; this module never
imports Dagster.
"""

from __future__ import annotations

import base64
import functools
import io
import string
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageDraw, ImageFont, ImageOps

# Side of one tile's picture area: big enough to recognise a product photo, small
# enough that a full sheet stays within the byte budget at a readable JPEG quality.
TILE_SIZE: Final = 72
# Height of the strip under each tile that carries its short caption; Pillow's
# default font (FreeType, size 10) needs 12 px with descenders.
LABEL_HEIGHT: Final = 14
# White space between tiles, so neighbouring pictures do not blend into each other.
GUTTER: Final = 2

# Dagster keeps every metadata value in its event log (Postgres rows, the UI's
# GraphQL payloads): a sheet should cost tens of kilobytes, not megabytes.
MAX_SHEET_MARKDOWN_BYTES: Final = 40_000

# Rejected objects shown per sheet: two rows of six, enough to see what kind of
# junk a partition holds; the table says how many there were in all.
MAX_REJECTED_TILES: Final = 12
REJECTED_COLUMNS: Final = 6
# Bytes fetched per rejected object at most. Decoding is bounded separately (below);
# this bounds the transfer and the memory holding the raw bytes.
DEFAULT_MAX_FETCH_BYTES: Final = 16 << 20

# Query rows per neighbour sheet, and neighbours per row: 6 x (1 + 5) tiles is
# about 0.22 megapixels, which fits the byte budget at a JPEG quality still good
# enough to compare products.
MAX_NEIGHBOUR_ROWS: Final = 6
MAX_NEIGHBOURS_PER_ROW: Final = 5

# Pixels a preview may decode at most, after JPEG's reduced-scale decoding (draft).
# 16 megapixels is at most 64 MB even in four-byte modes; a JPEG of up to
# 128 megapixels decodes at 1/8 scale within it, and anything bigger is no preview.
MAX_PREVIEW_DECODE_PIXELS: Final = 16_000_000
# Pillow plugins a preview may use: common raster formats only. Others (EPS runs
# Ghostscript, for one) do more than decode pixels, which untrusted bytes must not trigger.
PREVIEW_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# JPEG qualities tried for the sheet, best first: the first that fits the budget wins.
# Product photos fit at 65 or better; the low end is for content JPEG cannot
# compress (noise at tile scale needs 10 for a full neighbour sheet), which should
# still be shown small rather than blow the budget.
_JPEG_QUALITIES: Final = (85, 75, 65, 55, 45, 35, 25, 15, 10, 5)

# A rejected object's preview is re-encoded once before the sheet is; near-lossless,
# so the sheet's own quality decides what is lost.
_TILE_JPEG_QUALITY: Final = 95

# Table cells are shortened so a sheet's text part stays a small, bounded share of the budget.
MAX_REASON_CHARS: Final = 100
MAX_ID_CHARS: Final = 60
# Characters of a caption drawn under a tile at most; about as many fit 72 px in the default font.
_MAX_CAPTION_CHARS: Final = 14

NO_PREVIEW_GREY: Final = (128, 128, 128)
_SHEET_BACKGROUND: Final = (255, 255, 255)
_LETTERBOX: Final = (235, 235, 235)  # around a preview that is not square
_LABEL_BACKGROUND: Final = (40, 40, 40)
_LABEL_TEXT: Final = (255, 255, 255)
_NO_PREVIEW_TEXT: Final = (235, 235, 235)
_ELLIPSIS: Final = "…"


@dataclass(frozen=True)
class Tile:
    """One cell of a sheet: the encoded image to preview (None: a grey "no preview" tile) and a short caption."""

    preview: bytes | None
    caption: str


@dataclass(frozen=True)
class RejectedObject:
    """A row of `rejected_images`, plus the object's listed size when the caller knows it."""

    image_id: str | None
    uri: str
    reason: str
    # raw_image_manifest.size_bytes; None when unknown, and then the object is not
    # fetched under a fetch limit, since read_bytes reads an object whole.
    size_bytes: int | None = None


@dataclass(frozen=True)
class Neighbour:
    image_id: str
    jpeg: bytes  # 224x224 thumbnail, as stored in downscaled_images.image_jpeg
    similarity: float  # cosine


@dataclass(frozen=True)
class NeighbourRow:
    """A query thumbnail and its nearest neighbours, nearest first."""

    image_id: str
    jpeg: bytes
    neighbours: Sequence[Neighbour]


def markdown_bytes(markdown: str) -> int:
    """What a sheet costs in the event log: its UTF-8 size, as stored."""
    return len(markdown.encode("utf-8"))


def grid_size(cell_count: int, columns: int) -> tuple[int, int]:
    """Width and height in pixels of a sheet holding `cell_count` cells in `columns` columns."""
    used_columns = max(1, min(columns, cell_count))
    rows = max(1, -(-cell_count // columns))
    width = used_columns * TILE_SIZE + (used_columns + 1) * GUTTER
    height = rows * (TILE_SIZE + LABEL_HEIGHT) + (rows + 1) * GUTTER
    return width, height


def preview_image(
    data: bytes, max_pixels: int = MAX_PREVIEW_DECODE_PIXELS, tile_size: int = TILE_SIZE
) -> Image.Image | None:
    """An RGB image fitting a `tile_size` square made from untrusted bytes, or None when none can be made safely.

    Never decodes more than `max_pixels` pixels: the declared size is checked after
    `draft` (which makes JPEG decode at up to 1/8 scale) and before `load`.
    """
    try:
        # Our own pixel check below is stricter than Pillow's warning threshold; the
        # warning would only be noise in the run's logs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PREVIEW_FORMATS) as image:
                image.draft("RGB", (tile_size, tile_size))
                width, height = image.size
                if width <= 0 or height <= 0 or width * height > max_pixels:
                    return None
                image.load()
                # reducing_gap: Image.reduce first (cheap box averaging), then a proper resample.
                image.thumbnail((tile_size, tile_size), reducing_gap=2.0)
                oriented = ImageOps.exif_transpose(image)
                return _flattened_rgb(oriented)
    # Untrusted bytes make Pillow raise nearly anything (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, DecompressionBombError, MemoryError, ...):
    # any failure just means "no preview".
    except Exception:
        return None


def sheet_markdown(
    tiles: Sequence[Tile | None],
    columns: int,
    table_markdown: str = "",
    *,
    title: str = "contact sheet",
    max_markdown_bytes: int = MAX_SHEET_MARKDOWN_BYTES,
) -> str:
    """Markdown holding the tiles laid out in a grid as one JPEG, then `table_markdown` below it.

    A None tile leaves its cell empty. The JPEG quality is the best that keeps the
    whole markdown within `max_markdown_bytes`; if even the lowest does not, the
    lowest is used (markdown_bytes tells the caller what it costs).
    """
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    alt = _plain_text(title)
    if not tiles:
        return f"**{_escape_markdown(alt)}**: nothing to show\n\n{table_markdown}".rstrip() + "\n"
    sheet = _draw_grid(tiles, columns)
    prefix = f"![{_escape_markdown(alt)}](data:image/jpeg;base64,"
    suffix = f")\n\n{table_markdown}".rstrip() + "\n"
    text_bytes = markdown_bytes(prefix) + markdown_bytes(suffix)
    jpeg_budget = (max_markdown_bytes - text_bytes) * 3 // 4  # base64 makes 4 characters of 3 bytes
    jpeg = _jpeg_within(sheet, jpeg_budget)
    return prefix + base64.b64encode(jpeg).decode("ascii") + suffix


def rejected_images_sheet(
    rejected: Sequence[RejectedObject],
    read_bytes: Callable[[str], bytes],
    *,
    max_tiles: int = MAX_REJECTED_TILES,
    max_fetch_bytes: int | None = DEFAULT_MAX_FETCH_BYTES,
    max_markdown_bytes: int = MAX_SHEET_MARKDOWN_BYTES,
) -> str:
    """A sheet of the first `max_tiles` rejected objects, previewed where possible, with a table of their reasons.

    `read_bytes` (the object store's) may raise; that object gets a "no preview"
    tile. With `max_fetch_bytes` set, only objects whose listed size is known and
    within it are fetched at all; None fetches every object whole.
    """
    shown = rejected[:max_tiles]
    tiles: list[Tile | None] = []
    rows: list[str] = []
    for number, item in enumerate(shown, start=1):
        data, fetch_note = _fetched(item, read_bytes, max_fetch_bytes)
        picture = preview_image(data) if data is not None else None
        del data  # up to max_fetch_bytes each: hold one object's bytes at a time, not the sheet's
        note = fetch_note or ("shown" if picture is not None else "not a readable image")
        # The tile carries the small preview, re-encoded, so the object is decoded once.
        preview = _jpeg(picture, _TILE_JPEG_QUALITY) if picture is not None else None
        # The caption only has room for a short id; the table has the full one.
        tiles.append(Tile(preview=preview, caption=f"{number} {item.image_id or 'no id'}"))
        rows.append(_table_row([str(number), _display_id(item), _shortened(item.reason, MAX_REASON_CHARS), note]))
    table = _table(["#", "id", "reason", "preview"], rows)
    footer = f"\n\n{len(shown)} of {len(rejected)} rejected objects shown." if len(rejected) > len(shown) else ""
    return sheet_markdown(
        tiles,
        REJECTED_COLUMNS,
        table + footer,
        title="rejected images",
        max_markdown_bytes=max_markdown_bytes,
    )


def neighbours_sheet(
    rows: Sequence[NeighbourRow],
    *,
    max_rows: int = MAX_NEIGHBOUR_ROWS,
    max_neighbours: int = MAX_NEIGHBOURS_PER_ROW,
    max_markdown_bytes: int = MAX_SHEET_MARKDOWN_BYTES,
) -> str:
    """A sheet with one line per query: its thumbnail, then its nearest neighbours; and a table of ids and similarities."""
    shown = rows[:max_rows]
    columns = 1 + max((min(len(row.neighbours), max_neighbours) for row in shown), default=0)
    tiles: list[Tile | None] = []
    table_rows: list[str] = []
    for number, row in enumerate(shown, start=1):
        neighbours = row.neighbours[:max_neighbours]
        tiles.append(Tile(preview=row.jpeg, caption=f"Q{number}"))
        tiles.extend(Tile(preview=n.jpeg, caption=f"{n.similarity:.3f}") for n in neighbours)
        tiles.extend([None] * (columns - 1 - len(neighbours)))  # keep the next query in the first column
        cells = [f"Q{number}", _shortened(row.image_id, MAX_ID_CHARS)]
        cells += [f"{_shortened(n.image_id, MAX_ID_CHARS)} ({n.similarity:.3f})" for n in neighbours]
        cells += [""] * (columns - 1 - len(neighbours))
        table_rows.append(_table_row(cells))
    header = ["#", "query"] + [f"neighbour {i}" for i in range(1, columns)]
    table = _table(header, table_rows)
    footer = f"\n\n{len(shown)} of {len(rows)} queries shown." if len(rows) > len(shown) else ""
    return sheet_markdown(
        tiles, columns, table + footer, title="nearest neighbours", max_markdown_bytes=max_markdown_bytes
    )


def _fetched(
    item: RejectedObject, read_bytes: Callable[[str], bytes], max_fetch_bytes: int | None
) -> tuple[bytes | None, str | None]:
    """The object's bytes, or None with a note saying why it was not (or could not be) fetched."""
    if max_fetch_bytes is not None:
        if item.size_bytes is None:
            return None, "size unknown: not fetched"
        if item.size_bytes > max_fetch_bytes:
            return None, f"{item.size_bytes} bytes: over the fetch limit"
    try:
        data = read_bytes(item.uri)
    # The store raises its own errors, botocore's, OSError, ...: any of them only costs the preview.
    except Exception as exc:
        return None, f"read failed ({type(exc).__name__})"
    # The object may have grown since it was listed.
    if max_fetch_bytes is not None and len(data) > max_fetch_bytes:
        return None, f"{len(data)} bytes: over the fetch limit"
    return data, None


def _display_id(item: RejectedObject) -> str:
    """The image id, or for an object without one the end of its URI (the informative part)."""
    if item.image_id is not None:
        return _shortened(item.image_id, MAX_ID_CHARS)
    uri = item.uri
    tail = uri if len(uri) <= MAX_ID_CHARS else _ELLIPSIS + uri[-(MAX_ID_CHARS - 1) :]
    return f"(no id) {tail}"


def _draw_grid(tiles: Sequence[Tile | None], columns: int) -> Image.Image:
    sheet = Image.new("RGB", grid_size(len(tiles), columns), _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, tile in enumerate(tiles):
        if tile is None:
            continue
        left = GUTTER + (index % columns) * (TILE_SIZE + GUTTER)
        top = GUTTER + (index // columns) * (TILE_SIZE + LABEL_HEIGHT + GUTTER)
        picture = preview_image(tile.preview) if tile.preview is not None else None
        if picture is None:
            draw.rectangle((left, top, left + TILE_SIZE - 1, top + TILE_SIZE - 1), fill=NO_PREVIEW_GREY)
            _draw_centred(draw, "no preview", left, top + TILE_SIZE // 2, _NO_PREVIEW_TEXT)
        else:
            draw.rectangle((left, top, left + TILE_SIZE - 1, top + TILE_SIZE - 1), fill=_LETTERBOX)
            sheet.paste(picture, (left + (TILE_SIZE - picture.width) // 2, top + (TILE_SIZE - picture.height) // 2))
        label_top = top + TILE_SIZE
        draw.rectangle((left, label_top, left + TILE_SIZE - 1, label_top + LABEL_HEIGHT - 1), fill=_LABEL_BACKGROUND)
        caption = _fitting(draw, _plain_text(tile.caption))
        _draw_centred(draw, caption, left, label_top + LABEL_HEIGHT // 2, _LABEL_TEXT)
    return sheet


def _draw_centred(draw: ImageDraw.ImageDraw, text: str, left: int, middle_y: int, fill: tuple[int, int, int]) -> None:
    draw.text((left + TILE_SIZE // 2, middle_y), text, fill=fill, font=_font(), anchor="mm")


def _fitting(draw: ImageDraw.ImageDraw, text: str) -> str:
    """`text`, or its longest start marked with ".." (which every font has) that fits one tile's width."""

    def fits(candidate: str) -> bool:
        return draw.textlength(candidate, font=_font()) <= TILE_SIZE - 2

    if len(text) <= _MAX_CAPTION_CHARS and fits(text):
        return text
    for keep in range(min(len(text), _MAX_CAPTION_CHARS) - 2, 0, -1):
        if fits(text[:keep] + ".."):
            return text[:keep] + ".."
    return ""


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Loaded on first use, not at import: importing core must stay cheap.
    return ImageFont.load_default()


def _plain_text(text: str) -> str:
    """Printable ASCII only: the default font (a bitmap one where Pillow lacks FreeType) has no other glyphs."""
    return "".join(char if char in _PRINTABLE_ASCII else "?" for char in text.replace("\n", " ").replace("\r", " "))


_PRINTABLE_ASCII: Final = frozenset(string.digits + string.ascii_letters + string.punctuation + " ")


def _jpeg_within(image: Image.Image, max_bytes: int) -> bytes:
    jpeg = b""
    for quality in _JPEG_QUALITIES:
        jpeg = _jpeg(image, quality)
        if len(jpeg) <= max_bytes:
            return jpeg
    return jpeg  # even the lowest quality is over budget: still better shown than dropped


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # optimize: smaller Huffman tables at no cost in quality.
    image.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _flattened_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over the letterbox colour (a bare convert("RGB") turns it black)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*_LETTERBOX, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def _shortened(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + _ELLIPSIS


def _escape_markdown(text: str) -> str:
    """`text` as literal markdown on one line: control characters become spaces, ASCII punctuation is escaped.

    CommonMark lets any ASCII punctuation be backslash-escaped, so escaping all of
    it keeps ids and reasons from starting emphasis, links or HTML, and `\\|` keeps
    a `|` from splitting a table cell.
    """
    out = []
    for char in text:
        if char in string.punctuation:
            out.append("\\" + char)
        elif not char.isprintable():
            out.append(" ")  # newlines and the like would end the table row
        else:
            out.append(char)
    return "".join(out)


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_escape_markdown(cell) for cell in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[str]) -> str:
    return "\n".join([_table_row(header), "|" + "---|" * len(header), *rows])
