"""Names, keys and URIs of stored objects: the partition a key belongs to, why a first path segment cannot be a
partition key, a name that is not UTF-8 shown as text (and back), and the local path a URI names."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Final
from urllib.parse import urlparse

# A non-UTF-8 local name is shown (in keys and URIs) with its undecodable bytes as \xNN.
_ESCAPED_BYTE: Final = re.compile(r"\\x([89a-f][0-9a-f])")
NOT_UTF8: Final = "name is not valid UTF-8 (its bytes are shown as \\xNN): rename it in UTF-8"


def partition_key_problem(name: str) -> str | None:
    """Why a first path segment cannot be a partition key, or None when it can.

    Such a segment is reported by name with this reason (its objects belong to
    no partition) instead of being registered: a key that Dagster, its UI or an
    HTTP client would change or refuse would otherwise fail every run for it, or
    every registration of the prefixes found with it.
    """
    if not name:
        return "empty first path segment ('<root>//...'): it would stand for the whole root, so it is no partition"
    if any(unicodedata.category(char) == "Cs" for char in name):
        return NOT_UTF8
    if name in (".", ".."):
        return f"{name!r} is a path step: file systems and HTTP clients collapse it, so it names no folder of its own"
    # Dagster's own rule for partition keys (INVALID_PARTITION_SUBSTRINGS): "..." is
    # its range syntax, and control characters (it names seven) do not display in its UI.
    if "..." in name:
        return "contains '...', which Dagster reads as a partition range"
    control = next((char for char in name if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}, which Dagster and its UI cannot show"
    return None


def shown_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (surrogate-escaped by the OS layer) shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def partition_key_of(key: str) -> str | None:
    """The partition a key belongs to: its first path segment, or None directly under the root."""
    head, sep, _ = key.partition("/")
    return head if sep and head else None


def local_path_of(uri: str) -> Path | None:
    """The filesystem path of a local URI (plain path or file://), or None for remote schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def unshown_path(path: Path) -> Path | None:
    """The path `shown_name` turned into `path` (its \\xNN back to bytes), or None when it shows none."""
    text = str(path)
    if not _ESCAPED_BYTE.search(text):
        return None
    return Path(_ESCAPED_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), text))
