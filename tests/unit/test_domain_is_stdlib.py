"""The domain imports nothing but the standard library and itself (read from the source with
`ast`, so imports hidden under `TYPE_CHECKING` or inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

DOMAIN = Path(__file__).resolve().parents[2] / "domain"
MODULES = sorted(DOMAIN.rglob("*.py"))


def imported_roots(source: str) -> set[str]:
    """Top-level package of every import in `source`; "." for a relative import."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else (node.module or "").split(".")[0])
    return roots


def test_the_domain_has_modules() -> None:
    names = {m.name for m in MODULES}
    assert {"entities.py", "value_objects.py", "interfaces.py", "exceptions.py"} <= names


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_domain_module_imports_only_the_standard_library(module: Path) -> None:
    allowed = set(sys.stdlib_module_names) | {"domain", "__future__", "."}
    foreign = imported_roots(module.read_text()) - allowed
    assert not foreign, f"{module.name} imports {sorted(foreign)}"


def test_the_checker_sees_third_party_imports() -> None:
    source = (
        "import json\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sqlalchemy.orm import Session\n"
        "def f():\n"
        "    import structlog.stdlib\n"
        "from domain.payload import encode_json\n"
    )
    assert imported_roots(source) == {"json", "typing", "sqlalchemy", "structlog", "domain"}
