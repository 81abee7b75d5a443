"""The bad-input corpus through the downscaling step alone: every object accounted for, each with its fate."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.images import ImageLimits
from imgemb_assets.core.pipeline import build_manifest, downscale_partition
from imgemb_assets.core.storage import LocalObjectStore
from imgemb_assets_tests.bad_inputs import TEST_MAX_IMAGE_BYTES, bad_input_cases, write_cases

# Pillow warns on the header in its warning band before the step refuses the image.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, dict]]:
    root = tmp_path_factory.mktemp("raw")
    write_cases(root / "corpus", bad_input_cases())
    store = LocalObjectStore(root)
    manifest = build_manifest(store.list_objects("corpus"), "corpus")
    result = downscale_partition(store, manifest, ImageLimits(max_bytes=TEST_MAX_IMAGE_BYTES))
    assert manifest.num_rows == len(bad_input_cases())
    reasons = {Path(row["uri"]).name: row["reason"] for row in result.rejected.to_pylist()}
    kept = {row["image_id"]: row for row in result.images.to_pylist()}
    assert len(reasons) + len(kept) == manifest.num_rows  # each object in exactly one table
    return reasons, kept


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda case: case.file_name)
def test_each_bad_input_is_rejected_with_its_reason_or_kept_with_the_right_colours(
    outcome: tuple[dict[str, str], dict[str, dict]], case
) -> None:
    reasons, kept = outcome
    if case.reason_part is not None:
        assert case.file_name in reasons, f"{case.file_name} was not rejected"
        assert case.reason_part in reasons[case.file_name]
        return
    assert case.file_name not in reasons, reasons.get(case.file_name)
    thumbnail = kept[case.file_name.rsplit(".", 1)[0]]
    pixels = np.asarray(Image.open(io.BytesIO(thumbnail["image_jpeg"])))
    assert pixels.shape == (224, 224, 3)
    if case.mean_rgb is not None:
        assert np.allclose(pixels.reshape(-1, 3).mean(axis=0), case.mean_rgb, atol=3), pixels.reshape(-1, 3).mean(
            axis=0
        )


def test_rejection_reasons_tell_the_cases_apart(outcome: tuple[dict[str, str], dict[str, dict]]) -> None:
    reasons, _ = outcome
    assert len(set(reasons.values())) == len(reasons)


def test_exif_rotation_is_applied_to_the_recorded_size(outcome: tuple[dict[str, str], dict[str, dict]]) -> None:
    _, kept = outcome
    assert (kept["rotated"]["width"], kept["rotated"]["height"]) == (100, 200)


def test_an_object_over_the_size_limit_is_not_downloaded(tmp_path: Path) -> None:
    class CountingStore(LocalObjectStore):
        reads: list[str] = []

        def read_bytes(self, uri: str) -> bytes:
            self.reads.append(uri)
            return super().read_bytes(uri)

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "big.png").write_bytes(b"\x89PNG" + bytes(5_000))
    store = CountingStore(tmp_path)
    result = downscale_partition(store, build_manifest(store.list_objects("p"), "p"), ImageLimits(max_bytes=1_000))
    assert result.rejected.column("reason").to_pylist() == [
        "file too large: 5004 bytes exceeds the limit of 1000 bytes (max_image_bytes)"
    ]
    assert store.reads == []


def test_symbolic_links_are_listed_and_rejected_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg())
    folder = tmp_path / "raw" / "p"
    folder.mkdir(parents=True)
    (folder / "real.jpg").write_bytes(_jpeg())
    (folder / "to_outside.jpg").symlink_to(outside / "secret.jpg")
    (folder / "to_inside.jpg").symlink_to(folder / "real.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "to_folder").symlink_to(outside)
    store = LocalObjectStore(tmp_path / "raw")
    manifest = build_manifest(store.list_objects("p"), "p")
    result = downscale_partition(store, manifest)
    assert manifest.num_rows == 5
    assert result.images.column("image_id").to_pylist() == ["real"]
    reasons = {Path(row["uri"]).name: row["reason"] for row in result.rejected.to_pylist()}
    links = {"to_outside.jpg", "to_inside.jpg", "dangling.jpg", "to_folder"}
    assert set(reasons) == links
    # to_folder has no extension, so it is turned away before any read; the others are never read
    assert all(reasons[name].startswith("symbolic link: not followed") for name in links - {"to_folder"})


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()
