"""Listing and reading objects under a local root: partition keys, fingerprints, containment, names that are no partition."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imgemb_assets.core.storage.errors import ObjectRefused, StorageError
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.core.storage.names import partition_key_of, partition_key_problem
from imgemb_assets.core.storage.open_store import open_object_store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "2026-11-01" / "nested").mkdir(parents=True)
    (tmp_path / "2026-11-02").mkdir()
    (tmp_path / "empty-prefix").mkdir()
    (tmp_path / "2026-11-01" / "b.jpg").write_bytes(b"bbb")
    (tmp_path / "2026-11-01" / "nested" / "a.jpg").write_bytes(b"a")
    (tmp_path / "2026-11-02" / "c.png").write_bytes(b"cc")
    (tmp_path / "stray.jpg").write_bytes(b"no partition")
    return tmp_path


def test_prefixes_are_first_level_folders_holding_objects(root: Path) -> None:
    assert open_object_store(str(root)).list_prefixes() == ["2026-11-01", "2026-11-02"]


def test_objects_are_listed_recursively_in_key_order_with_content_etags(root: Path) -> None:
    objects = list(open_object_store(str(root)).list_objects("2026-11-01"))
    assert [obj.key for obj in objects] == ["2026-11-01/b.jpg", "2026-11-01/nested/a.jpg"]
    assert objects[0].etag == hashlib.md5(b"bbb").hexdigest()
    assert objects[0].size_bytes == 3
    assert all(partition_key_of(obj.key) == "2026-11-01" for obj in objects)


def test_files_directly_under_the_root_belong_to_no_partition(root: Path) -> None:
    store = LocalObjectStore(root)
    assert store.list_root_files() == ["stray.jpg"]
    assert partition_key_of("stray.jpg") is None


def test_reading_outside_the_root_is_refused(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret")
    store = open_object_store(str(root))
    with pytest.raises(StorageError, match="outside the root"):
        store.read_bytes(str(root / ".." / outside.parent.name / "secret.txt"))
    with pytest.raises(StorageError, match="outside the root"):
        list(store.list_objects("../" + outside.parent.name))


def test_unsupported_scheme_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'"):
        open_object_store("gs://bucket/raw")


def test_a_name_that_is_not_utf8_is_listed_shown_with_escapes_and_refused(tmp_path: Path) -> None:
    # Linux takes any bytes but '/' and NUL in a name; Python hands them over surrogate-escaped.
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "ok.jpg").write_bytes(b"ok")
    bad = os.fsdecode(b"caf\xe9.jpg")  # Latin-1, not UTF-8
    (tmp_path / "p" / bad).write_bytes(b"latin1")
    store = LocalObjectStore(tmp_path)
    objects = list(store.list_objects("p"))
    assert [obj.key for obj in objects] == ["p/caf\\xe9.jpg", "p/ok.jpg"]
    assert all(obj.uri.encode() and obj.key.encode() for obj in objects)  # valid UTF-8 text everywhere
    assert objects[0].etag == hashlib.md5(b"latin1").hexdigest()
    assert store.refusal(objects[0].uri) == "name is not valid UTF-8 (its bytes are shown as \\xNN): rename it in UTF-8"
    assert store.refusal(objects[1].uri) is None
    with pytest.raises(ObjectRefused, match="not valid UTF-8"):
        store.read_bytes(objects[0].uri)


def test_a_linked_partition_folder_is_refused_and_never_followed(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.jpg").write_bytes(b"a")
    (tmp_path / "q").symlink_to(tmp_path / "p")  # would duplicate p's images as q's
    (tmp_path / "stray.jpg").symlink_to(tmp_path / "p" / "a.jpg")
    store = LocalObjectStore(tmp_path)
    listing = store.list_partition_folders()
    assert listing.prefixes == ["p"]
    assert listing.refused == {"q": "symbolic link to a folder: links are listed, never followed"}
    assert store.list_root_files() == ["stray.jpg"]  # a link to a file is listed like a file
    # q registered while it was a folder: listing it is an error that names it, never p's images as q's
    with pytest.raises(StorageError, match="prefix 'q' is now a symbolic link to another folder of the root"):
        list(store.list_objects("q"))


def test_first_segments_that_cannot_be_partitions_are_refused_by_name(tmp_path: Path) -> None:
    # name -> None (a partition) or a part of the reason it is refused
    names = {
        "ok": None,
        " lead": None,
        "trail ": None,
        "it's": None,
        "a...b": "'...'",
        "tab\there": "U+0009",
        "bell\x07": "U+0007",
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jpg").write_bytes(b"a")
    listing = LocalObjectStore(tmp_path).list_partition_folders()
    assert listing.prefixes == sorted(name for name, reason in names.items() if reason is None)
    assert sorted(listing.refused) == sorted(name for name, part in names.items() if part)
    for name, reason in listing.refused.items():
        assert names[name] in reason


@pytest.mark.parametrize(
    ("name", "reason_part"),
    [
        ("", "empty first path segment"),
        (".", "path step"),
        ("..", "path step"),
        ("2026...2027", "partition range"),
        ("line\nbreak", "U+000A"),
        ("nul\x00", "U+0000"),
        ("del\x7f", "U+007F"),
        ("c1\x85", "U+0085"),
        (os.fsdecode(b"\xff"), "not valid UTF-8"),
    ],
)
def test_partition_key_problems_name_the_reason(name: str, reason_part: str) -> None:
    problem = partition_key_problem(name)
    assert problem is not None and reason_part in problem


@pytest.mark.parametrize(
    "name", ["2026-11-01", " lead", "trail ", "it's", 'say "hi"', "café ☕", "ж" * 300, "a..b", "100%"]
)
def test_ordinary_and_odd_but_valid_names_are_partition_keys(name: str) -> None:
    assert partition_key_problem(name) is None
