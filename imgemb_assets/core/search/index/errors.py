"""What the search index refuses, one exception family (`SearchIndexError` and its kinds), and the signal a load
acts on when a file its manifest names is gone (`NamedFileMissing`)."""

from __future__ import annotations


class SearchIndexError(Exception):
    """The search index cannot do what was asked; the message says why."""


class UnknownImageId(SearchIndexError, KeyError):
    """No indexed vector has this image_id (in this prefix, when one was given)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class AmbiguousImageId(SearchIndexError):
    """The image_id is indexed in several prefixes and no prefix was given."""


class IndexMissing(SearchIndexError):
    """No index was written for this model under this lake root."""


class ModelMismatch(SearchIndexError):
    """The vectors, queries or stored index belong to another model_id or width."""


class InvalidPartition(SearchIndexError):
    """A partition's ids and vectors do not fit together (count, duplicates, shape)."""


class IndexCommitConflict(SearchIndexError):
    """Another writer saved this model's index after this one loaded it: this save wrote nothing that counts."""


class NamedFileMissing(Exception):
    """A file the manifest names is gone; a load reads the manifest again, in case a save retired the file meanwhile."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
