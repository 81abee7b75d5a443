"""The wiring's domains import only the domains below them (the order in `dagster_wiring/__init__.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

from imgemb_assets_tests.import_order import imported_domains

WIRING = Path(__file__).resolve().parents[2] / "imgemb_assets" / "dagster_wiring"
# Lower levels first; a domain may import its own modules and those of lower levels only.
LEVELS: dict[str, int] = {
    "names": 0,
    "location": 1,
    "ingest": 2, "sales": 2, "embedding": 2, "lake": 2,
    "search": 3,
    "evaluation": 4,
    "backfills": 5,
}  # fmt: skip


def _domain_of(path: Path) -> str:
    relative = path.relative_to(WIRING)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_of_the_wiring_is_in_a_known_domain() -> None:
    modules = [path for path in WIRING.rglob("*.py") if path.name != "__init__.py" or path.parent != WIRING]
    assert {_domain_of(path) for path in modules} == set(LEVELS)
    assert len(modules) > len(LEVELS)


def test_each_domain_imports_only_itself_and_the_domains_below_it() -> None:
    wrong = []
    for path in sorted(WIRING.rglob("*.py")):
        if path.parent == WIRING and path.name == "__init__.py":
            continue
        domain = _domain_of(path)
        for imported in imported_domains(path, "imgemb_assets.dagster_wiring") - {domain}:
            if imported not in LEVELS or LEVELS[imported] >= LEVELS[domain]:
                wrong.append(f"{path.relative_to(WIRING)} imports {imported}")
    assert wrong == []


def test_domain_packages_import_nothing_when_imported() -> None:
    for package in sorted(WIRING.glob("*/__init__.py")):
        tree = ast.parse(package.read_text())
        assert not [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)], package
