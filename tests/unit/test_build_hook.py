"""hatch_build.py: the wheel's import rewriting, on samples and on the whole repository.

tests/test_install.py builds and installs the real wheel; these cases pin down the rewriting
rules that one build cannot show (forms of import the code base does not use today).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hatch_build import PACKAGES, RewriteError, rewrite_imports, stage
from tests.support.deployment import ROOT_PATH


def test_absolute_imports_of_our_packages_move_under_tasklane() -> None:
    source = '''"""from worker import docstring stays"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from domain.entities import Task  # from domain import comment stays
from worker import cli_render as render
import persistence.pg as pg
from migrations import env

if TYPE_CHECKING:
    from worker.operator import (
        Operator,
        Tree,
    )


def later() -> None:
    from worker.app import TasklaneWorker
    x = "é"; from worker.config import Settings
    from \\
        worker.logs import get_logger
'''
    expected = '''"""from worker import docstring stays"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tasklane.domain.entities import Task  # from domain import comment stays
from tasklane.worker import cli_render as render
import tasklane.persistence.pg as pg
from tasklane.migrations import env

if TYPE_CHECKING:
    from tasklane.worker.operator import (
        Operator,
        Tree,
    )


def later() -> None:
    from tasklane.worker.app import TasklaneWorker
    x = "é"; from tasklane.worker.config import Settings
    from \\
        tasklane.worker.logs import get_logger
'''
    assert rewrite_imports(source) == expected


def test_other_imports_and_strings_are_left_alone() -> None:
    source = (
        "from . import sibling\n"
        "from .worker import x\n"
        "from workers import y\n"
        "import domainx\n"
        "import os.path as worker\n"
        'NAME = "worker.demo_agents"\n'
    )
    assert rewrite_imports(source) == source


def test_a_bare_import_of_our_package_is_refused() -> None:
    """`import worker.app` binds `worker`; installed, only `tasklane` would be bound."""
    with pytest.raises(RewriteError, match=r"line 2: `import worker.app` binds the name 'worker'"):
        rewrite_imports("import os\nimport worker.app\n")


def test_line_endings_are_kept() -> None:
    source = "import os\r\nfrom worker import app\r\n"
    assert rewrite_imports(source) == "import os\r\nfrom tasklane.worker import app\r\n"


def test_the_whole_repository_stages_with_no_import_left_outside_tasklane(tmp_path: Path) -> None:
    written = stage(ROOT_PATH, tmp_path / "tasklane")
    relative = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"tasklane/__init__.py", "tasklane/worker/cli.py", "tasklane/migrations/env.py"} <= (
        relative
    )
    assert "tasklane/migrations/script.py.mako" in relative  # data files come along
    assert not any("__pycache__" in p for p in relative)
    for path in written:
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in PACKAGES, (path, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in PACKAGES, (path, alias.name)
