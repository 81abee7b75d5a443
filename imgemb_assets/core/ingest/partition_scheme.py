"""How the objects under the raw-images root are cut into partitions: the partition scheme.

A bucket is what its owner made it, so the cut is a setting (`IMGEMB_PARTITION_SCHEME`):

    folders         one partition per first-level folder (the default)
    folders:N       one partition per folder N levels deep (`folders:3` for `YYYY/MM/DD/`)
    folders:N,hash:B  each of those folders split into B stable hash buckets of its objects' keys
                    (a folder too big to be one partition; its buckets run on several workers)
    hash:B          every object of the root in B hash buckets, folders ignored (a flat root)
    ...,loose:L     objects lying above the partition folders (directly under the root for
                    `folders`) go into L hash buckets; `loose:0` leaves them in no partition
                    (they are then summarised in one line per discovery tick). Default 16.

With the default, the article's flat bucket (every photo directly under the root)
is embedded with no setting changed: its photos fall into the 16 `(loose)/...`
buckets, and a root of first-level folders keeps one partition per folder. Keys:

    2026-11-01                   a folder (folders)
    2026/11/01                   a folder three levels deep (folders:3)
    2026-11-01/part-03-of-08     bucket 3 of a folder (folders,hash:8)
    (loose)/part-07-of-16        bucket 7 of the loose objects
    part-12-of-64                bucket 12 of the root (hash:64)

A bucket is `sha256(key relative to the root) mod B`: stable across machines, runs
and Python versions, so an object stays in its partition for ever. Changing the
scheme moves objects between partitions; the lake records the scheme it was
written with (`scheme_record.py`) and refuses another.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from imgemb_assets.core.storage.names import partition_key_problem

# The first segment of every loose-object bucket's key; a folder of that name is no partition.
LOOSE_FOLDER: Final = "(loose)"
DEFAULT_LOOSE_BUCKETS: Final = 16
DEFAULT_SCHEME_TEXT: Final = "folders"
# Deeper than this is a mistake, not a layout (and each level is one more listing per tick).
MAX_DEPTH: Final = 8
# A hash bucket count past this makes partitions of a handful of objects each.
MAX_BUCKETS: Final = 4096
_BUCKET_NAME: Final = re.compile(r"part-(\d+)-of-(\d+)")


class PartitionSchemeError(ValueError):
    """A scheme that cannot be parsed, or a partition key that is not one of the scheme's."""


@dataclass(frozen=True)
class PartitionPlace:
    """Where a partition's objects are: under `folder` (recursively), in hash bucket `bucket` of `buckets` or all.

    `folder` None means the loose objects (those above the partition folders).
    """

    folder: str | None
    bucket: int | None = None
    buckets: int = 1

    def holds(self, key: str) -> bool:
        """Whether the object `key` (relative to the root, found under this place's folder) is in the partition."""
        return self.bucket is None or bucket_of(key, self.buckets) == self.bucket


@dataclass(frozen=True)
class PartitionScheme:
    depth: int = 1  # folder levels of a partition key; 0: folders ignored, every object hashed
    split: int = 1  # hash buckets per folder (depth >= 1), or of the whole root (depth 0)
    loose_buckets: int = DEFAULT_LOOSE_BUCKETS  # buckets of the objects above `depth`; 0: in no partition

    def __post_init__(self) -> None:
        if not 0 <= self.depth <= MAX_DEPTH:
            raise PartitionSchemeError(f"folder depth must be 0..{MAX_DEPTH}, got {self.depth}")
        if not 1 <= self.split <= MAX_BUCKETS or not 0 <= self.loose_buckets <= MAX_BUCKETS:
            raise PartitionSchemeError(f"hash buckets must be 1..{MAX_BUCKETS} (loose: 0..{MAX_BUCKETS})")
        if self.depth == 0 and self.split < 2:
            raise PartitionSchemeError("hash:B needs at least 2 buckets (one bucket is the whole root)")

    @classmethod
    def parse(cls, text: str) -> PartitionScheme:
        """`folders`, `folders:N`, `hash:B`, each optionally followed by `,hash:B` (folders) and `,loose:L`."""
        parts = [part.strip() for part in text.strip().lower().split(",")]
        if not parts or not parts[0]:
            raise PartitionSchemeError(f"empty partition scheme {text!r}: use e.g. folders, folders:3 or hash:64")
        values: dict[str, int] = {}
        for part in parts:
            name, _, number = part.partition(":")
            if name not in ("folders", "hash", "loose") or name in values:
                raise PartitionSchemeError(_usage(text, f"unknown or repeated part {part!r}"))
            if number == "" and name == "folders":
                values[name] = 1
                continue
            if not number.isdigit():
                raise PartitionSchemeError(_usage(text, f"{part!r} needs a whole number after ':'"))
            values[name] = int(number)
        if "folders" not in values and "hash" not in values:
            raise PartitionSchemeError(_usage(text, "name folders or hash first"))
        if parts[0].startswith("hash") and "folders" in values:
            raise PartitionSchemeError(_usage(text, "write folders before hash"))
        depth = values.get("folders", 0)
        if depth == 0 and "loose" in values:
            raise PartitionSchemeError(_usage(text, "hash:B already covers every object; loose applies to folders"))
        try:
            return cls(
                depth=depth, split=values.get("hash", 1), loose_buckets=values.get("loose", DEFAULT_LOOSE_BUCKETS)
            )
        except PartitionSchemeError as exc:
            raise PartitionSchemeError(_usage(text, str(exc))) from exc

    def __str__(self) -> str:
        if self.depth == 0:
            return f"hash:{self.split}"
        text = "folders" if self.depth == 1 else f"folders:{self.depth}"
        if self.split > 1:
            text += f",hash:{self.split}"
        return text + ("" if self.loose_buckets == DEFAULT_LOOSE_BUCKETS else f",loose:{self.loose_buckets}")

    @property
    def splits_folders(self) -> bool:
        """Whether a partition is a part of a folder (or of the root) rather than a whole one."""
        return self.split > 1

    def partition_of(self, key: str) -> str | None:
        """The partition of the object `key` (relative to the root), or None when the scheme covers it not."""
        if self.depth == 0:
            return bucket_key(bucket_of(key, self.split), self.split)
        folders = key.split("/")[:-1]
        if len(folders) < self.depth:
            if self.loose_buckets == 0:
                return None
            return f"{LOOSE_FOLDER}/{bucket_key(bucket_of(key, self.loose_buckets), self.loose_buckets)}"
        folder = folder_problem(folders[: self.depth])
        if folder is not None:
            return None
        path = "/".join(folders[: self.depth])
        return f"{path}/{bucket_key(bucket_of(key, self.split), self.split)}" if self.splits_folders else path

    def partition_in_folder(self, folder: str, key: str) -> str:
        """The partition of an object found under the partition folder `folder` ("" the root under hash:B).

        Everything listed under a folder is its partition's, even what `partition_of` would not
        place from its key alone (a sub-folder that cannot be listed is listed as one object).
        """
        if self.depth == 0:
            return bucket_key(bucket_of(key, self.split), self.split)
        if not self.splits_folders:
            return folder
        return f"{folder}/{bucket_key(bucket_of(key, self.split), self.split)}"

    def partitions_of_folder(self, folder: str) -> list[str]:
        """Every partition key a partition folder (depth `depth`; "" the root under hash:B) can hold, in order."""
        if self.depth == 0:
            return [bucket_key(bucket, self.split) for bucket in range(self.split)]
        if not self.splits_folders:
            return [folder]
        return [f"{folder}/{bucket_key(bucket, self.split)}" for bucket in range(self.split)]

    def loose_partitions(self) -> list[str]:
        """Every loose-object bucket's key (none under hash:B or loose:0)."""
        if self.depth == 0:
            return []
        return [f"{LOOSE_FOLDER}/{bucket_key(bucket, self.loose_buckets)}" for bucket in range(self.loose_buckets)]

    def place_of(self, partition_key: str) -> PartitionPlace:
        """Where a partition's objects are; PartitionSchemeError when the key is none of this scheme's."""
        segments = partition_key.split("/")
        if self.depth == 0:
            bucket = _bucket_number(partition_key, self.split)
            if bucket is None:
                raise self._foreign(partition_key)
            return PartitionPlace("", bucket, self.split)
        if segments[0] == LOOSE_FOLDER and len(segments) == 2 and self.loose_buckets:
            bucket = _bucket_number(segments[1], self.loose_buckets)
            if bucket is None:
                raise self._foreign(partition_key)
            return PartitionPlace(None, bucket, self.loose_buckets)
        expected = self.depth + (1 if self.splits_folders else 0)
        if len(segments) != expected or folder_problem(segments[: self.depth]) is not None:
            raise self._foreign(partition_key)
        folder = "/".join(segments[: self.depth])
        if not self.splits_folders:
            return PartitionPlace(folder)
        bucket = _bucket_number(segments[-1], self.split)
        if bucket is None:
            raise self._foreign(partition_key)
        return PartitionPlace(folder, bucket, self.split)

    def is_partition_key(self, partition_key: str) -> bool:
        try:
            self.place_of(partition_key)
        except PartitionSchemeError:
            return False
        return True

    def _foreign(self, partition_key: str) -> PartitionSchemeError:
        return PartitionSchemeError(f"{partition_key!r} is no partition key of the partition scheme {str(self)!r}")


def folder_problem(segments: list[str]) -> str | None:
    """Why a partition folder (its path segments) cannot be a partition, or None when it can."""
    for segment in segments:
        problem = partition_key_problem(segment)
        if problem is not None:
            return problem
    if segments and segments[0] == LOOSE_FOLDER:
        return f"{LOOSE_FOLDER!r} is the name of the loose objects' partitions: rename the folder"
    return None


def bucket_of(key: str, buckets: int) -> int:
    """The stable hash bucket of an object key (relative to the root)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def bucket_key(bucket: int, buckets: int) -> str:
    # Zero-padded, so the UI and `sorted` list buckets in order.
    return f"part-{bucket:0{len(str(buckets - 1))}d}-of-{buckets}"


def _bucket_number(name: str, buckets: int) -> int | None:
    match = _BUCKET_NAME.fullmatch(name)
    if match is None or int(match.group(2)) != buckets or bucket_key(int(match.group(1)), buckets) != name:
        return None
    number = int(match.group(1))
    return number if number < buckets else None


def _usage(text: str, problem: str) -> str:
    return (
        f"partition scheme {text!r}: {problem}; use folders, folders:N, folders:N,hash:B or hash:B, "
        "optionally followed by ,loose:L"
    )
