"""What a prefix becomes in a table: its physical partition value (`partition_value`, a folder name on any file system),
and the SQL that selects it, with string literals and identifiers quoted so that no value can widen a predicate."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Final

from imgemb_assets.core.lake.tables import PARTITION_COLUMN

# A prefix is its own partition value when it is this short and uses only
# characters delta-rs leaves as they are in a folder name; others get a stem and a hash.
_PLAIN_VALUE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNPLAIN_RUN: Final = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_CHARS: Final = 32
_HASH_HEX_CHARS: Final = 20  # 80 bits: no two of a billion prefixes share a value, in practice


def partition_predicate(partition_key: str, column: str = PARTITION_COLUMN) -> str:
    """A Delta predicate matching exactly one value of `column`.

    The key is a SQL string literal with quotes doubled, so no key can close the
    literal and widen the predicate.
    """
    return f"{column} = {sql_string(partition_key)}"


def sql_string(value: str) -> str:
    """A SQL string literal of `value`, quotes doubled: no value can close the literal and widen a predicate."""
    escaped = value.replace("'", "''")
    return f"'{escaped}'"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def partition_value(prefix: str) -> str:
    """The physical partition value of a prefix: stable, at most 64 ASCII characters, a folder name on any file system.

    A short prefix of letters, digits and `._-` is its own value, so the usual
    (date) prefixes keep readable folders and their keys are read from the log
    alone. Any other prefix becomes a readable stem, `~` (in no plain value, so
    the two kinds never meet) and a hash of the whole prefix.
    """
    if _PLAIN_VALUE.fullmatch(prefix):
        return prefix
    folded = unicodedata.normalize("NFKD", prefix).encode("ascii", "ignore").decode()  # café -> cafe
    stem = _UNPLAIN_RUN.sub("_", folded)[:_STEM_CHARS]
    digest = hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX_CHARS]
    return f"{stem}~{digest}"
