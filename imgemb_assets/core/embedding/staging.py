"""Vectors of a partition being embedded, staged under the lake batch by batch, so a killed step resumes.

While a partition is embedded, every model batch's vectors are written as one small
parquet file before the next batch goes through the model:

    <lake>/_staging/image_embeddings/<partition_value(prefix)>/<partition_value(model_id)>/<writer>-<n>.parquet

with the columns image_id, etag, model_id and embedding. A rerun of the partition
(after a SIGKILL, an OOM, a lost spot instance, a commit that failed) reads them back
as more reusable stored vectors, keyed by (image_id, etag) under the current model_id
like the table's own, so only images not yet staged go through the model again: a kill
costs at most the batch that was in the model. Once the partition's commit has
succeeded, the folder of that partition and model is deleted.

Each file appears whole or not at all: on S3 it is one PUT (pyarrow's output stream
uploads it when closed), locally it is written under a dot-name and renamed. A file read
whole that is not a staged batch (truncated, corrupt: pages carry CRC checksums, verified
on read, or of another shape) is ignored and deleted; one that could not be fetched (a
network error) is skipped and kept. Neither is fatal, and neither is a failed staging
write (the step then only loses the ability to resume that batch). Folder names go through
`partition_value`, which is lossy for long or odd names; the model_id column inside
each file is what a rerun checks, so two models can never share vectors.

The folder of another model_id (the weights changed between the kill and the rerun)
is left alone: its vectors are still right for that model.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgemb_assets.core.lake.embedding_column import EMBEDDING_TYPE, embedding_array
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.partition_values import partition_value
from imgemb_assets.core.storage.arrow_filesystem import arrow_location
from imgemb_assets.core.storage.names import local_path_of

# Under the lake root, beside the tables (`_` keeps it out of any table name).
STAGING_FOLDER: Final = "_staging"
STAGED_SCHEMA: Final = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("embedding", EMBEDDING_TYPE, nullable=False),
    ]
)
_SUFFIX: Final = ".parquet"
# Staged files read at once when a rerun collects them (S3 GETs overlap; each is one batch of vectors).
_READ_AHEAD: Final = 8

Warn = Callable[[str], None]


class PartitionStaging:
    """The staged vectors of one partition of one table under one model_id."""

    def __init__(self, lake: Lake, table: str, prefix: str, model_id: str, warn: Warn | None = None) -> None:
        self.model_id = model_id
        self.uri = f"{staging_root_uri(lake)}/{table}/{partition_value(prefix)}/{partition_value(model_id)}"
        folder = arrow_location(self.uri, lake.current_storage_options())
        self._fs: pafs.FileSystem = folder.filesystem
        self._path: str = folder.path
        self._is_local: bool = folder.is_local
        self._warn: Warn = warn or (lambda message: None)
        self._writer = uuid.uuid4().hex[:12]  # two writers of the partition never overwrite each other's files
        self._written = 0
        self.rows_staged = 0  # rows this writer staged
        self.rows_found = 0  # readable staged rows found by `read`
        self.files_ignored = 0  # staged files found unreadable (and deleted) by `read`
        self.write_failures = 0
        self._maybe_left = True  # False once `read` found the folder empty (and nothing was written since)

    # --- writing ------------------------------------------------------------------------

    def write(self, image_ids: Sequence[str], etags: Sequence[str], vectors: np.ndarray) -> None:
        """Stage one batch of vectors durably, as one file; a failure is warned about, never raised."""
        if len(image_ids) == 0:
            return
        table = pa.table(
            {
                "image_id": pa.array(image_ids, pa.string()),
                "etag": pa.array(etags, pa.string()),
                "model_id": pa.array([self.model_id] * len(image_ids), pa.string()),
                "embedding": embedding_array(vectors),
            },
            schema=STAGED_SCHEMA,
        )
        name = f"{self._writer}-{self._written:06d}{_SUFFIX}"
        try:
            self._write_file(name, table)
        except Exception as error:  # staging only saves work on a rerun: never fail the partition for it
            self.write_failures += 1
            self._maybe_left = True  # a local scratch file, perhaps
            if self.write_failures == 1:
                self._warn(
                    f"could not stage vectors under {self.uri} ({type(error).__name__}: {error}); "
                    "a rerun after a kill recomputes what was not staged"
                )
            return
        self._written += 1
        self._maybe_left = True
        self.rows_staged += len(image_ids)

    def _write_file(self, name: str, table: pa.Table) -> None:
        target = f"{self._path}/{name}"
        if not self._is_local:
            with self._fs.open_output_stream(target) as stream:  # one object, visible once whole
                _write_parquet(stream, table)
            return
        # the folder may have been cleared by a concurrent writer that committed: make it every time (a mkdir)
        self._fs.create_dir(self._path, recursive=True)
        scratch = f"{self._path}/.{name}.tmp"
        with self._fs.open_output_stream(scratch) as stream:
            _write_parquet(stream, table)
        self._fs.move(scratch, target)  # a rename: the file appears whole

    # --- reading ------------------------------------------------------------------------

    def read(self) -> Iterator[pa.RecordBatch]:
        """Every readable staged batch (STAGED_SCHEMA), a few files read ahead; unreadable files are deleted.

        Counts `rows_found` and `files_ignored` as it goes. A folder that cannot be
        listed is warned about and reads as empty.
        """
        try:
            listed = self._listing()
        except Exception as error:
            self._warn(f"could not list staged vectors under {self.uri} ({type(error).__name__}: {error}); ignored")
            return
        if not listed:
            self._maybe_left = self._written > 0 or self.write_failures > 0
            return
        names = _staged_names(listed)
        with ThreadPoolExecutor(max_workers=_READ_AHEAD, thread_name_prefix="staged-read") as pool:
            pending: deque[tuple[str, Future[pa.Buffer]]] = deque()
            queued = iter(names)
            for name in queued:
                pending.append((name, pool.submit(self._read_file, name)))
                if len(pending) >= _READ_AHEAD:
                    break
            while pending:
                name, future = pending.popleft()
                following = next(queued, None)
                if following is not None:
                    pending.append((following, pool.submit(self._read_file, following)))
                try:
                    body = future.result()
                except Exception as error:  # not read (a network error): skipped, kept for another rerun
                    self._warn(f"could not read staged vectors {self.uri}/{name} ({type(error).__name__}: {error})")
                    continue
                try:
                    table = _parsed(body)
                except Exception as error:  # read, but not a whole staged batch: never will be
                    self._ignore(name, error)
                    continue
                self.rows_found += table.num_rows
                yield from table.to_batches()

    def staged_files(self) -> list[str]:
        """Names of the staged files (written whole), sorted; scratch files of local writes are not among them."""
        return _staged_names(self._listing())

    def _listing(self) -> list[str]:
        listed = self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True, recursive=False))
        return [info.base_name for info in listed if info.type == pafs.FileType.File]

    def _read_file(self, name: str) -> pa.Buffer:
        # The whole file first (one batch, at most a few MB): a failed read is then told apart from bad content.
        with self._fs.open_input_stream(f"{self._path}/{name}") as source:
            return source.read_buffer()

    def _ignore(self, name: str, error: Exception) -> None:
        self.files_ignored += 1
        self._warn(f"ignored unreadable staged vectors {self.uri}/{name} ({type(error).__name__}: {error})")
        try:
            self._fs.delete_file(f"{self._path}/{name}")
        except Exception:
            pass  # gone already, or read-only: it is ignored again next time

    # --- cleanup ------------------------------------------------------------------------

    def clear(self) -> None:
        """Delete the staged vectors of this partition and model (after its commit); a failure is warned about.

        Nothing to do (no request on S3) when `read` found none and none was written since:
        a partition whose every vector was reused costs one listing, not two requests.
        """
        if not self._maybe_left:
            return
        try:
            # delete_dir, not delete_dir_contents: on S3 that one leaves a marker object for the folder.
            # (pyarrow still leaves an empty marker for the prefix's folder when nothing else is under it.)
            if self._fs.get_file_info(self._path).type == pafs.FileType.Directory:
                self._fs.delete_dir(self._path)
            if self._is_local:
                _remove_empty_parents(Path(self._path), levels=3)  # the prefix's, the table's and `_staging`
        except Exception as error:
            self._warn(f"could not delete staged vectors under {self.uri} ({type(error).__name__}: {error})")


def staging_root_uri(lake: Lake) -> str:
    """`<lake root>/_staging`, an absolute path for a local lake."""
    local = local_path_of(lake.root_uri)
    root = str(local.resolve()) if local is not None else lake.root_uri.rstrip("/")
    return f"{root}/{STAGING_FOLDER}"


def _parsed(body: pa.Buffer) -> pa.Table:
    table = pq.read_table(pa.BufferReader(body), page_checksum_verification=True)
    missing = [column for column in STAGED_SCHEMA.names if column not in table.column_names]
    if missing:
        raise ValueError(f"no column {missing}")
    return table.select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)


def _staged_names(names: list[str]) -> list[str]:
    return sorted(name for name in names if name.endswith(_SUFFIX) and not name.startswith("."))


def _remove_empty_parents(path: Path, levels: int) -> None:
    for parent in list(path.parents)[:levels]:
        try:
            parent.rmdir()  # only when empty: another prefix or model may be staging there
        except OSError:
            return


def _write_parquet(stream: pa.NativeFile, table: pa.Table) -> None:
    # float32 vectors hardly compress; the CRCs let a rerun tell a damaged file from a good one
    pq.write_table(table, stream, compression="none", write_statistics=False, write_page_checksum=True)
