"""Listing and reading objects under a local root: partition keys, fingerprints, containment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from imgemb_assets.core.storage import LocalObjectStore, StorageError, open_object_store, partition_key_of


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
