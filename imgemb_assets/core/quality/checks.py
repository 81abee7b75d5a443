"""Data-quality checks on the tables, as plain functions: what is wrong, in words, with numbers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

_SHOWN = 10


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def duplicate_image_ids(sales: pa.Table) -> CheckOutcome:
    """The join on image_id would multiply embedding rows for every duplicated id."""
    counts = pc.value_counts(sales.column("image_id")).to_pylist()
    duplicated = sorted(item["values"] for item in counts if item["counts"] > 1)
    if not duplicated:
        return CheckOutcome(True, "every image_id appears once", {"duplicated_ids": 0})
    return CheckOutcome(
        False,
        f"{len(duplicated)} image_ids appear more than once in the sales export, e.g. {duplicated[:_SHOWN]}",
        {"duplicated_ids": len(duplicated)},
    )


def manifest_accounted_for(manifest_uris: Iterable[str], downscaled: int, rejected_uris: Iterable[str]) -> CheckOutcome:
    """Every listed object ends in exactly one of downscaled_images and rejected_images."""
    manifest, rejected = list(manifest_uris), list(rejected_uris)
    stray = sorted(set(rejected) - set(manifest))
    balanced = len(manifest) == downscaled + len(rejected) and not stray
    description = (
        f"manifest {len(manifest)} = downscaled {downscaled} + rejected {len(rejected)}"
        if balanced
        else f"manifest {len(manifest)} != downscaled {downscaled} + rejected {len(rejected)}"
        + (f"; rejected objects not in the manifest: {stray[:_SHOWN]}" if stray else "")
    )
    return CheckOutcome(
        balanced, description, {"manifest": len(manifest), "downscaled": downscaled, "rejected": len(rejected)}
    )


def sales_coverage(joined: int, downscaled: int, minimum: float) -> CheckOutcome:
    """The share of the partition's images that have a sales row."""
    fraction = joined / downscaled if downscaled else 1.0
    passed = fraction >= minimum
    verb = "at least" if passed else "below"
    return CheckOutcome(
        passed,
        f"{fraction:.1%} of {downscaled} images have a sales row ({verb} the {minimum:.0%} threshold)",
        {"fraction_with_sales": round(fraction, 4), "minimum": minimum},
    )


def embedding_values(
    widths: Iterable[int], expected_width: int | None, non_finite_rows: int, rows: int
) -> CheckOutcome:
    """Every vector has the model's width and only finite values."""
    seen = sorted(set(widths))
    width_ok = not seen or (len(seen) == 1 and (expected_width is None or seen[0] == expected_width))
    passed = width_ok and non_finite_rows == 0
    problems = []
    if not width_ok:
        problems.append(f"widths {seen}, expected {expected_width}")
    if non_finite_rows:
        problems.append(f"{non_finite_rows} of {rows} vectors hold NaN or infinite values")
    return CheckOutcome(
        passed,
        "; ".join(problems) or f"{rows} vectors of width {seen[0] if seen else expected_width}, all finite",
        {"non_finite_rows": non_finite_rows, "widths": seen},
    )
