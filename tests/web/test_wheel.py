"""The wheel carries the dashboard's templates and static files (the build hook stages them)."""

from __future__ import annotations

from pathlib import Path

from hatch_build import stage
from worker.web.app import HERE

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_stages_the_dashboards_templates_and_static_files(tmp_path: Path) -> None:
    staged = {p.relative_to(tmp_path).as_posix() for p in stage(ROOT, tmp_path / "tasklane")}
    expected = {
        f"tasklane/worker/web/{p.relative_to(HERE).as_posix()}"
        for p in HERE.rglob("*")
        if p.is_file() and p.suffix in (".html", ".js", ".css", ".svg", ".md")
    }
    assert "tasklane/worker/web/static/chart.umd.min.js" in expected
    assert "tasklane/worker/web/templates/base.html" in expected
    assert expected <= staged


def test_without_the_web_extra_tasklane_web_says_what_to_install() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from worker.cli import main; sys.exit(main(['web']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tasklane: the dashboard needs the web extra (uvicorn is missing): "
        "pip install 'tasklane[web]'"
    ]
