"""Wheel build hook: tasklane's packages install under one name, `tasklane`.

In the repository the packages sit at the top level (`domain`, `persistence`, `worker`,
`migrations`) and import each other by those names. Installed that way they would collide with
users' own modules (a service's `worker.py` on PYTHONPATH shadows tasklane's `worker`), so the
wheel holds them as `tasklane.domain`, `tasklane.persistence`, … next to the `tasklane` facade,
with every absolute import of them rewritten to match. Nothing else changes: not a line moves
(tracebacks of the installed code point at the repository's line numbers), strings are left
alone (a module named in a string must be a name that works both ways, like
`tasklane.demo_agents`), and each rewritten file is parsed again and compared with the
original's syntax tree, imports renamed, so a rewrite that missed or mangled anything fails
the build instead of shipping.

Editable installs (`uv sync` in the repository) put the repository itself on sys.path
(`dev-mode-dirs` in pyproject.toml) and are not rewritten.
"""

from __future__ import annotations

import ast
import copy
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NAMESPACE = "tasklane"
PACKAGES = frozenset({"domain", "persistence", "worker", "migrations"})
SKIPPED = frozenset({"__pycache__"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# `from`, then blanks or line continuations, then the module: where the namespace goes.
_FROM_MODULE = re.compile(r"from(?:[ \t]|\\\r?\n)+")
_LINE = re.compile(r".*?(?:\r\n|\r|\n)|.+\Z", re.DOTALL)


class RewriteError(Exception):
    """A source file cannot be moved under the namespace without changing what it means."""


class NamespaceHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"
    _staging: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        self._staging = Path(tempfile.mkdtemp(prefix="tasklane-wheel-"))
        try:
            staged_files = stage(Path(self.root), self._staging / NAMESPACE)
        except BaseException:
            self._remove_staging()
            raise
        # File by file: a forced file replaces the selected one at its path (the facade's own
        # files are selected by `packages` and replaced here by their rewritten copies).
        for staged in staged_files:
            build_data["force_include"][str(staged)] = staged.relative_to(self._staging).as_posix()

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        self._remove_staging()

    def _remove_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def stage(root: Path, target: Path) -> list[Path]:
    """Copy the facade (`tasklane/`) and the packages under it into `target`, rewritten;
    return the files written."""
    written: list[Path] = []
    sources = [(root / NAMESPACE, target)]
    sources += [(root / name, target / name) for name in sorted(PACKAGES)]
    for source_dir, target_dir in sources:
        if not source_dir.is_dir():
            raise RewriteError(f"{source_dir} is missing: the wheel would be incomplete")
        for path in _files(source_dir):
            destination = target_dir / path.relative_to(source_dir)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".py":
                text = path.read_text(encoding="utf-8")
                try:
                    destination.write_text(rewrite_imports(text), encoding="utf-8")
                except RewriteError as exc:
                    raise RewriteError(f"{path.relative_to(root)}: {exc}") from None
            else:
                shutil.copy2(path, destination)
            written.append(destination)
    return written


def _files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if (
            path.is_file()
            and not SKIPPED & set(path.parts)
            and not path.name.endswith(SKIPPED_SUFFIXES)
        ):
            yield path


def rewrite_imports(source: str) -> str:
    """`source` with every absolute import of PACKAGES moved under NAMESPACE, line for line."""
    tree = ast.parse(source)
    text = _Text(source)
    insertions: list[int] = []  # character offsets in `source` where the namespace goes
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
            keyword = _FROM_MODULE.match(source, text.offset(node.lineno, node.col_offset))
            if keyword is None:
                raise RewriteError(f"line {node.lineno}: cannot find the module of this import")
            insertions.append(keyword.end())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if not _ours(alias.name):
                    continue
                if alias.asname is None:
                    root = alias.name.split(".")[0]
                    raise RewriteError(
                        f"line {alias.lineno}: `import {alias.name}` binds the name {root!r}, "
                        "which installed code does not have; write `from … import …` or "
                        f"`import {alias.name} as …`"
                    )
                insertions.append(text.offset(alias.lineno, alias.col_offset))
    rewritten = source
    for offset in sorted(insertions, reverse=True):
        rewritten = f"{rewritten[:offset]}{NAMESPACE}.{rewritten[offset:]}"
    _check(tree, rewritten)
    return rewritten


class _Text:
    """Translates `ast` positions (line number, UTF-8 byte column) into offsets in the text."""

    def __init__(self, source: str) -> None:
        # Lines as the tokenizer counts them (str.splitlines would also split at \f, \x1c…).
        self.lines = _LINE.findall(source)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, byte_column: int) -> int:
        line = self.lines[lineno - 1].encode("utf-8")
        return self.starts[lineno - 1] + len(line[:byte_column].decode("utf-8"))


def _ours(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in PACKAGES


def _check(original: ast.Module, rewritten: str) -> None:
    """The rewritten source must parse to the original tree with only the imports renamed."""
    expected = copy.deepcopy(original)
    for node in ast.walk(expected):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
            node.module = f"{NAMESPACE}.{node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    alias.name = f"{NAMESPACE}.{alias.name}"
    try:
        actual = ast.parse(rewritten)
    except SyntaxError as exc:
        raise RewriteError(f"the rewritten source does not parse: {exc}") from None
    if ast.dump(actual) != ast.dump(expected):
        raise RewriteError("the rewritten source differs from the original beyond its imports")
