"""What a module imports of a package's subpackages: the domain-order tests of the core and of the wiring."""

from __future__ import annotations

import ast
from pathlib import Path


def imported_domains(path: Path, package: str) -> set[str]:
    """The first name below `package` (dotted, e.g. `imgemb_assets.core`) of every import in the file at `path`."""
    prefix = package.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[: len(prefix)] == prefix and len(parts) > len(prefix):
                found.add(parts[len(prefix)])
    return found
