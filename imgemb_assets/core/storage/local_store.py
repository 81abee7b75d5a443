"""The objects under a local folder (`LocalObjectStore`): regular files, symbolic links (listed, never followed) and
what cannot be listed or read, each refused with its reason when read, so no object vanishes unaccounted for."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from imgemb_assets.core.storage.errors import ObjectMissing, ObjectRefused, StorageError
from imgemb_assets.core.storage.names import NOT_UTF8, local_path_of, partition_key_problem, shown_name, unshown_path
from imgemb_assets.core.storage.objects import FolderListing, FolderPage, ObjectInfo, PrefixListing

# Read local files in chunks when fingerprinting, so a large file never sits in memory twice.
_HASH_CHUNK_BYTES: Final = 1 << 20


def _md5_of_file(path: Path) -> str:
    # md5 of the content is what S3 reports as the ETag of a single-part upload,
    # so a local root and a bucket fingerprint the same file the same way.
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(path: Path) -> str | None:
    """'file', 'link', 'folder', 'other' (a FIFO, a device: never read), 'unknown' (cannot be looked at), None (gone)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "unknown"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _etag(path: Path, status: os.stat_result | None) -> str:
    if status is not None and stat.S_ISLNK(status.st_mode):
        # a link's fingerprint is its target's name: the link is what is listed
        return hashlib.md5(os.fsencode(os.readlink(path))).hexdigest()
    if status is not None and stat.S_ISREG(status.st_mode):
        try:
            return _md5_of_file(path)
        except PermissionError:
            pass
    # What cannot be read: its mode is in, so fixing permissions changes the
    # listing's fingerprint and the partition is materialized again.
    facts = "unknown" if status is None else f"{status.st_mode}\0{status.st_size}\0{status.st_mtime_ns}"
    return hashlib.md5(f"unread\0{facts}".encode()).hexdigest()


@dataclass(frozen=True)
class LocalObjectStore:
    """Objects are the regular files below a folder, its symbolic links, and its folders that cannot be listed.

    Links are listed (so they are accounted for) but never followed: reading one
    raises ObjectRefused, since it could lead outside the root. A first-level link
    to a folder is refused as a partition. A folder that cannot be listed, a file
    that cannot be read and a name that is not UTF-8 are listed too, and refused
    with the reason when read, so no object vanishes from a manifest unaccounted for.
    """

    root: Path

    def __post_init__(self) -> None:
        # Resolve once so containment checks and relative keys compare like with like.
        object.__setattr__(self, "root", self.root.resolve())

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def list_prefixes(self) -> list[str]:
        return self.list_partition_folders().prefixes

    def list_partition_folders(self) -> PrefixListing:
        if not self.root.is_dir():
            raise StorageError(f"raw-images root {self.root} is not a folder")
        prefixes: list[str] = []
        refused: dict[str, str] = {}
        for entry in os.scandir(self.root):
            is_link, is_folder = _kind(Path(entry.path)) == "link", os.path.isdir(entry.path)  # isdir follows links
            if is_link and is_folder:
                refused[shown_name(entry.name)] = "symbolic link to a folder: links are listed, never followed"
            elif is_folder and any(self._walk(Path(entry.path))):
                problem = partition_key_problem(entry.name)
                if problem is None:
                    prefixes.append(entry.name)
                else:
                    refused[shown_name(entry.name)] = problem
        return PrefixListing(sorted(prefixes), refused)

    def list_folder(self, folder: str) -> FolderListing:
        top = self._inside_root(self.root / folder) if folder else self.root
        if not top.is_dir():
            raise StorageError(f"raw-images folder {top} is not a folder")
        objects: list[Path] = []
        folders: list[str] = []
        refused: dict[str, str] = {}
        for entry in os.scandir(top):
            path = Path(entry.path)
            relative = f"{folder}/{entry.name}" if folder else entry.name
            kind = _kind(path)
            if kind == "link" and os.path.isdir(entry.path):  # isdir follows links
                refused[shown_name(relative)] = "symbolic link to a folder: links are listed, never followed"
            elif kind == "folder":
                if any(self._walk(path)):
                    problem = partition_key_problem(entry.name)
                    if problem is None:
                        folders.append(relative)
                    else:
                        refused[shown_name(relative)] = problem
            elif kind in ("file", "link", "unknown"):
                objects.append(path)
        return FolderListing(list(self._infos(sorted(objects))), sorted(folders), refused)

    def list_folder_pages(self, folder: str, start_after: str | None, max_pages: int) -> FolderPage:
        # A local folder is listed whole: a directory read has no pages, and a million entries take seconds.
        return FolderPage(self.list_folder(folder), None)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        top = self.root / prefix
        if prefix and top.is_symlink():
            # A partition registered before its folder became a link: following it would
            # list another partition's images (or anything outside the root) as its own.
            where = (
                "another folder of the root" if top.resolve().is_relative_to(self.root) else "a folder outside the root"
            )
            raise StorageError(
                f"the folder of prefix {prefix!r} is now a symbolic link to {where}: links are never followed"
            )
        folder = self._inside_root(top)
        if folder.is_dir():
            yield from self._infos(sorted(self._walk(folder)))

    def list_root_files(self) -> list[str]:
        names = []
        for entry in os.scandir(self.root):
            kind = _kind(Path(entry.path))
            if kind in ("file", "unknown") or (kind == "link" and not os.path.isdir(entry.path)):
                names.append(shown_name(entry.name))
        return sorted(names)

    def read_bytes(self, uri: str) -> bytes:
        path = local_path_of(uri)
        if path is None:
            raise StorageError(f"{uri!r} is not a local path")
        reason = self.refusal(uri)
        if reason is not None:
            raise ObjectRefused(reason)
        try:
            return self._inside_root(path).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{uri} no longer exists") from exc
        except PermissionError as exc:
            raise ObjectRefused(f"permission denied reading the file ({exc.strerror}): fix its permissions") from exc

    def refusal(self, uri: str) -> str | None:
        path = local_path_of(uri)
        if path is None:
            return None
        kind = _kind(path)
        if kind is None:
            original = unshown_path(path)
            if original is not None and _kind(original) is not None:
                return NOT_UTF8
            return None  # gone: reading it says so
        if kind == "link":
            return "symbolic link: not followed (it could lead outside the raw-images root)"
        if kind == "unknown":
            return "cannot be inspected (permission denied on its folder): fix the folder's permissions"
        if kind == "folder":
            try:
                os.scandir(path).close()
            except OSError as exc:
                return (
                    f"folder cannot be listed ({exc.strerror}): its files are not in the manifest; fix its permissions"
                )
            return "folder could not be listed when the manifest was made: materialize the partition again"
        return None

    def _walk(self, folder: Path) -> Iterator[Path]:
        """Files and links below `folder`, and what cannot be listed or inspected (never skipped in silence)."""
        unlisted: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unlisted.append):
            # os.walk puts links to folders among the folders (not descended into)
            for name in [*filenames, *dirnames]:
                path = Path(dirpath) / name
                if _kind(path) in ("file", "link", "unknown"):
                    yield path
            yield from (Path(error.filename) for error in unlisted)
            unlisted.clear()
        yield from (Path(error.filename) for error in unlisted)

    def _infos(self, paths: list[Path]) -> Iterator[ObjectInfo]:
        for path in paths:
            try:
                status: os.stat_result | None = path.lstat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            except OSError:
                status = None  # its folder can be listed but not searched
            yield ObjectInfo(
                uri=shown_name(str(path)),
                key=shown_name(path.relative_to(self.root).as_posix()),
                size_bytes=0 if status is None else status.st_size,
                etag=_etag(path, status),
                last_modified=datetime.fromtimestamp(0 if status is None else status.st_mtime, tz=UTC),
            )

    def _inside_root(self, path: Path) -> Path:
        # A key such as '../x' must never make a run read outside its root.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise StorageError(f"{path} is outside the root {self.root}")
        return resolved
