"""The bad-input corpus through the downscaling step alone: every object accounted for, each with its fate; and
objects the file system will not hand over (unreadable, unlistable, not UTF-8, linked), each rejected with its reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.imaging.images import ImageLimits
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.thumbnails import downscale_partition
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_support.bad_inputs import TEST_MAX_IMAGE_BYTES, bad_input_cases, write_cases

REPO_ROOT = Path(__file__).resolve().parents[2]

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
        reads: ClassVar[list[str]] = []

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


def test_a_file_name_that_is_not_utf8_is_rejected_by_name_and_the_others_kept(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(_jpeg())
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(_jpeg())
    (folder / os.fsdecode(b"\xe9t\xe9")).mkdir()  # a folder on the way counts too
    (folder / os.fsdecode(b"\xe9t\xe9") / "inner.jpg").write_bytes(_jpeg())
    store = LocalObjectStore(tmp_path)
    manifest = build_manifest(store.list_objects("p"), "p")
    result = downscale_partition(store, manifest)
    assert result.images.column("image_id").to_pylist() == ["ok"]
    reason = "name is not valid UTF-8 (its bytes are shown as \\xNN): rename it in UTF-8"
    assert result.rejected.select(["image_id", "reason"]).to_pylist() == [
        {"image_id": "caf\\xe9", "reason": reason},
        {"image_id": "inner", "reason": reason},
    ]


# Listed, planned and downscaled as a user who cannot read some of the files (root reads everything).
_AS_UNPRIVILEGED = """
import json, sys
from pathlib import Path
from imgemb_assets.core.ingest.discovery import DiscoveryCursor, plan_discovery
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.thumbnails import downscale_partition
from imgemb_assets.core.storage.local_store import LocalObjectStore

store = LocalObjectStore(Path(sys.argv[1]))
plan = plan_discovery(store, DiscoveryCursor(), recent=5)
outcome = {"new": plan.new_prefixes, "refused": plan.refused_prefixes, "errors": plan.listing_errors}
for prefix in plan.new_prefixes:
    result = downscale_partition(store, build_manifest(store.list_objects(prefix), prefix))
    outcome[prefix] = {
        "kept": result.images.column("image_id").to_pylist(),
        "rejected": {row["uri"][len(sys.argv[1]) + 1 :]: row["reason"] for row in result.rejected.to_pylist()},
    }
print(json.dumps(outcome))
"""


def _run_unprivileged(script: str, *args: str) -> str:
    command = [sys.executable, "-c", script, *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be taken away from root")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def world_readable_root() -> Iterator[Path]:
    """A root the unprivileged user can reach (pytest's own temporary folders are root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="imgemb-perm-")).resolve()
    root.chmod(0o755)
    try:
        yield root
    finally:
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root)


def test_unreadable_files_and_folders_are_rejected_with_their_reason_and_the_others_go_on(
    world_readable_root: Path,
) -> None:
    root = world_readable_root
    for folder in ("p", "p/sealed", "q", "r"):
        (root / folder).mkdir(mode=0o755)
    for key in ("p/ok.jpg", "p/locked.jpg", "p/sealed/hidden.jpg", "q/x.jpg", "r/fine.jpg"):
        (root / key).write_bytes(_jpeg())
        (root / key).chmod(0o644)
    (root / "p" / "locked.jpg").chmod(0o000)
    (root / "p" / "sealed").chmod(0o000)
    (root / "q").chmod(0o000)
    outcome = json.loads(_run_unprivileged(_AS_UNPRIVILEGED, str(root)))
    assert outcome["new"] == ["p", "q", "r"] and outcome["refused"] == {} and outcome["errors"] == {}
    assert outcome["p"] == {
        "kept": ["ok"],
        "rejected": {
            "p/locked.jpg": "permission denied reading the file (Permission denied): fix its permissions",
            "p/sealed": "folder cannot be listed (Permission denied): its files are not in the manifest; fix its permissions",
        },
    }
    assert outcome["q"] == {
        "kept": [],
        "rejected": {
            "q": "folder cannot be listed (Permission denied): its files are not in the manifest; fix its permissions"
        },
    }
    assert outcome["r"] == {"kept": ["fine"], "rejected": {}}


def test_fixing_permissions_changes_the_fingerprint(world_readable_root: Path) -> None:
    # the partition is then materialized again, and the file read
    root = world_readable_root
    (root / "p").mkdir(mode=0o755)
    (root / "p" / "a.jpg").write_bytes(b"a")
    (root / "p" / "a.jpg").chmod(0o000)
    script = (
        "import sys; from pathlib import Path; from imgemb_assets.core.ingest.discovery import listing_fingerprint; "
        "from imgemb_assets.core.storage.local_store import LocalObjectStore; "
        "print(listing_fingerprint(LocalObjectStore(Path(sys.argv[1])).list_objects('p')))"
    )
    locked = _run_unprivileged(script, str(root))
    (root / "p" / "a.jpg").chmod(0o644)
    assert _run_unprivileged(script, str(root)) != locked
