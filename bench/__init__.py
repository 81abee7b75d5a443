"""Benchmarks that need Dagster, deltalake or the moto server; run from the repository root."""

import json
from collections.abc import Mapping


def print_summary(summary: Mapping[str, object]) -> None:
    """One line per measure, then the whole summary as one JSON line (what the notes quote)."""
    width = max(len(key) for key in summary) + 2
    for key, value in summary.items():
        print(f"{key:{width}s} {value}")
    print(json.dumps(summary))
