"""The core's domains import only the domains below them (the order in the README's Layout section)."""

from __future__ import annotations

import ast
from pathlib import Path

from imgemb_assets_tests.import_order import imported_domains

CORE = Path(__file__).resolve().parents[2] / "imgemb_assets" / "core"
# Lower levels first; a domain may import its own modules and those of lower levels only.
LEVELS: dict[str, int] = {
    "storage": 0, "imaging": 0, "quality": 0,
    "lake": 1,
    "ingest": 2, "sales": 2, "embedding": 2,
    "search": 3, "evaluation": 3,
    "sample": 4,
}  # fmt: skip
# Entry modules at the top of core/ (a benchmark's `-m` path, the README's Python API) may import any domain.
ENTRY_MODULES = {"embedding_bench.py", "similar.py", "__init__.py"}


def test_every_module_of_core_is_in_a_known_domain_or_an_entry_module() -> None:
    top = {path.name for path in CORE.glob("*.py")}
    assert top == ENTRY_MODULES
    assert {path.name for path in CORE.iterdir() if path.is_dir() and path.name != "__pycache__"} == set(LEVELS)


def test_each_domain_imports_only_itself_and_the_domains_below_it() -> None:
    wrong = []
    for domain, level in LEVELS.items():
        for path in sorted((CORE / domain).rglob("*.py")):  # a domain's subpackages too
            for imported in imported_domains(path, "imgemb_assets.core") - {domain}:
                if imported not in LEVELS or LEVELS[imported] >= level:
                    wrong.append(f"{path.relative_to(CORE)} imports {imported}")
    assert wrong == []


def test_domain_packages_import_nothing_when_imported() -> None:
    for domain in LEVELS:
        # the domain's own __init__.py and those of its subpackages
        for init in sorted((CORE / domain).rglob("__init__.py")):
            tree = ast.parse(init.read_text())
            assert not [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)], init
