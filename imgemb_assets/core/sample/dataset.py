"""A small, deterministic sample dataset in the article's bucket layout.

    <root>/raw-images/<prefix>/<image_id>.jpg|png   varied sizes, a few broken files
    <root>/sales-data/sales.parquet                 most image ids, plus ids with no image

Used by the demo and the tests; it needs nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgemb_assets.core.imaging.synthetic import synthetic_photo

DEFAULT_PREFIXES: Final = ("2026-11-01", "2026-11-02", "2026-11-03")
_MARKER: Final = "sample-dataset.json"
_CATEGORIES: Final = ("shoes", "bags", "shirts", "hats", "watches")
# Broken objects, one kind per entry: (file suffix, what the bytes are).
_BROKEN_KINDS: Final = (
    (".jpg", "empty"),
    (".jpg", "truncated-jpeg"),
    (".jpg", "text"),
    (".jpg", "html"),
    (".png", "random-bytes"),
)


@dataclass(frozen=True)
class SampleDataset:
    root: str
    raw_images_uri: str
    sales_uri: str
    prefixes: list[str]
    # prefix -> image ids that decode, and prefix -> file names that do not
    image_ids: dict[str, list[str]] = field(default_factory=dict)
    broken_files: dict[str, list[str]] = field(default_factory=dict)
    sales_image_ids: list[str] = field(default_factory=list)

    def expected_joined(self, prefix: str) -> int:
        """Rows the joined and embedding tables hold for a prefix."""
        return len(set(self.image_ids[prefix]) & set(self.sales_image_ids))


def generate_sample_dataset(
    root: Path,
    images_per_prefix: int = 100,
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES,
    seed: int = 0,
    sales_coverage: float = 0.9,
    ids_without_image: int = 5,
) -> SampleDataset:
    """Write the dataset under `root`, or reuse it when the same one is already there."""
    params = {
        "images_per_prefix": images_per_prefix,
        "prefixes": list(prefixes),
        "seed": seed,
        "sales_coverage": sales_coverage,
        "ids_without_image": ids_without_image,
    }
    marker = root / _MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["params"] == params:
            # Regenerating would change file times and so the manifest: reuse it.
            return SampleDataset(**saved["dataset"])
    raw_root, sales_root = root / "raw-images", root / "sales-data"
    for folder in (raw_root, sales_root):
        shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    image_ids: dict[str, list[str]] = {}
    broken: dict[str, list[str]] = {}
    for index, prefix in enumerate(prefixes):
        folder = raw_root / prefix
        folder.mkdir(parents=True)
        image_ids[prefix] = [
            _write_image(folder, f"img_{index:02d}{number:04d}", rng) for number in range(images_per_prefix)
        ]
        broken[prefix] = []
    for number, (suffix, kind) in enumerate(_BROKEN_KINDS):
        prefix = prefixes[number % len(prefixes)]
        name = f"broken_{number:02d}_{kind}{suffix}"
        (raw_root / prefix / name).write_bytes(_broken_bytes(kind, rng))
        broken[prefix].append(name)
    sales_ids = _write_sales(sales_root, image_ids, rng, sales_coverage, ids_without_image)
    dataset = SampleDataset(
        root=str(root),
        raw_images_uri=str(raw_root),
        sales_uri=str(sales_root),
        prefixes=list(prefixes),
        image_ids=image_ids,
        broken_files=broken,
        sales_image_ids=sales_ids,
    )
    marker.write_text(json.dumps({"params": params, "dataset": asdict(dataset)}, indent=1))
    return dataset


def _write_image(folder: Path, image_id: str, rng: np.random.Generator) -> str:
    width, height = (int(v) for v in rng.integers(48, 1024, size=2))
    image = synthetic_photo(rng, width, height)
    if rng.random() < 0.1:
        image.save(folder / f"{image_id}.png", format="PNG")
    else:
        image.save(folder / f"{image_id}.jpg", format="JPEG", quality=int(rng.integers(70, 96)))
    return image_id


def _broken_bytes(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated-jpeg":
        buffer = io.BytesIO()
        synthetic_photo(rng, 640, 480).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()[: buffer.tell() // 3]
    if kind == "text":
        return b"sku,notes\nimg,this is a CSV export saved with a .jpg name\n"
    if kind == "html":
        return b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"
    if kind == "random-bytes":
        return rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    raise ValueError(f"unknown broken kind {kind!r}")


def _write_sales(
    sales_root: Path,
    image_ids: dict[str, list[str]],
    rng: np.random.Generator,
    coverage: float,
    ids_without_image: int,
) -> list[str]:
    # Every prefix gets at least one image without a sales row, so the inner
    # join visibly drops images however small the sample is.
    covered: list[str] = []
    for ids in image_ids.values():
        missing = max(1, round(len(ids) * (1 - coverage)))
        left_out = set(rng.choice(ids, size=missing, replace=False).tolist())
        covered += [image_id for image_id in ids if image_id not in left_out]
    orphans = [f"img_orphan_{number:04d}" for number in range(ids_without_image)]
    sales_ids = sorted(covered) + orphans
    write_sales_export(sales_root, sales_ids, rng)
    return sales_ids


def write_sales_export(sales_root: Path, sales_ids: list[str], rng: np.random.Generator) -> None:
    """One parquet file of the export's columns for `sales_ids`: random sales and prices, categories in turn."""
    table = pa.table(
        {
            "image_id": pa.array(sales_ids, pa.string()),
            "sales": pa.array(rng.integers(0, 5000, size=len(sales_ids)), pa.int64()),
            "category": pa.array([_CATEGORIES[i % len(_CATEGORIES)] for i in range(len(sales_ids))], pa.string()),
            "price": pa.array(np.round(rng.uniform(5, 500, size=len(sales_ids)), 2), pa.float64()),
        }
    )
    sales_root.mkdir(parents=True)
    pq.write_table(table, sales_root / "sales.parquet")
