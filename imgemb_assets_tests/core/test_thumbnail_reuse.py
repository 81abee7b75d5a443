"""A rewrite of a partition's thumbnails reuses what is stored: unchanged objects are neither read nor decoded,
a new or changed object is, and a change of the recipe (decode settings, limits) makes everything again."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from imgemb_assets.core.imaging.images import ImageLimits
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.thumbnails import (
    DownscaledPartition,
    StoredThumbnails,
    downscale_partition,
    thumbnail_recipe,
)
from imgemb_assets.core.storage.local_store import LocalObjectStore


class _CountingStore(LocalObjectStore):
    """The real local store, counting the objects it reads."""

    reads: list[str]

    def read_bytes(self, uri: str) -> bytes:
        self.reads.append(uri.rsplit("/", 1)[-1])
        return super().read_bytes(uri)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _partition(tmp_path: Path) -> Path:
    folder = tmp_path / "p"
    folder.mkdir()
    for number in range(6):
        (folder / f"img_{number}.jpg").write_bytes(_jpeg(number))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def _run(store: _CountingStore, limits: ImageLimits, stored: StoredThumbnails | None) -> DownscaledPartition:
    store.reads = []
    manifest = build_manifest(store.list_objects("p"), "p")
    return downscale_partition(store, manifest, limits, max_workers=2, stored=stored)


def _stored(result: DownscaledPartition, limits: ImageLimits) -> StoredThumbnails:
    return StoredThumbnails.of(result.images, result.rejected, thumbnail_recipe(limits))


def test_an_unchanged_partition_is_rewritten_without_reading_an_object(tmp_path: Path) -> None:
    _partition(tmp_path)
    store, limits = _CountingStore(tmp_path), ImageLimits()
    first = _run(store, limits, None)
    assert (first.decoded, first.reused, len(store.reads)) == (7, 0, 7)
    again = _run(store, limits, _stored(first, limits))
    assert (again.decoded, again.reused, store.reads) == (0, 7, [])
    assert again.images.equals(first.images) and again.rejected.equals(first.rejected)


def test_only_a_new_or_changed_object_is_read_and_decoded(tmp_path: Path) -> None:
    folder = _partition(tmp_path)
    store, limits = _CountingStore(tmp_path), ImageLimits()
    first = _run(store, limits, None)
    (folder / "img_new.jpg").write_bytes(_jpeg(100))
    (folder / "img_2.jpg").write_bytes(_jpeg(200))  # same name, new content: a new etag
    again = _run(store, limits, _stored(first, limits))
    assert sorted(store.reads) == ["img_2.jpg", "img_new.jpg"]
    assert (again.decoded, again.reused) == (2, 6)
    fresh = _run(_CountingStore(tmp_path), limits, None)  # what a first write makes of the same objects
    assert again.images.sort_by("image_id").equals(fresh.images.sort_by("image_id"))
    assert again.rejected.equals(fresh.rejected)


def test_another_recipe_makes_every_thumbnail_again(tmp_path: Path) -> None:
    _partition(tmp_path)
    store = _CountingStore(tmp_path)
    draft = ImageLimits()
    first = _run(store, draft, None)
    full = ImageLimits(full_size_jpeg_decode=True)
    assert thumbnail_recipe(full) != thumbnail_recipe(draft)
    again = _run(store, full, _stored(first, full))  # the stored rows were made with the draft recipe
    assert (again.decoded, again.reused) == (7, 0)
    # only the number of decodes at once is not part of the recipe
    assert thumbnail_recipe(ImageLimits(max_decode_bytes=1 << 20)) == thumbnail_recipe(draft)


def test_a_rejection_that_depends_on_storage_is_decided_again(tmp_path: Path) -> None:
    folder = _partition(tmp_path)
    store, limits = _CountingStore(tmp_path), ImageLimits()
    (folder / "gone.jpg").write_bytes(_jpeg(7))
    manifest = build_manifest(store.list_objects("p"), "p")
    (folder / "gone.jpg").unlink()  # deleted after it was listed
    store.reads = []
    first = downscale_partition(store, manifest, limits, stored=None)
    reasons = dict(zip(first.rejected.column("uri").to_pylist(), first.rejected.column("etag").to_pylist()))
    assert reasons[str(folder / "gone.jpg")] is None  # not reusable
    assert reasons[str(folder / "broken.jpg")] is not None  # decided by its content: reusable
    (folder / "gone.jpg").write_bytes(_jpeg(7))  # back, same bytes, same etag
    again = downscale_partition(store, manifest, limits, stored=_stored(first, limits))
    assert again.decoded == 1 and "gone" in again.images.column("image_id").to_pylist()
