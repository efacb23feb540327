"""Actions on the dashboard: the token, the session cookie, CSRF, the audit log, bulk actions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support import db
from tests.web.conftest import TOKEN, Web, insert_tasks
from worker.web import app as web_app
from worker.web.auth import TokenError, read_token


async def status_of(url: str, task_id: Any) -> str:
    return str(await db.value(url, "SELECT status FROM tasks WHERE id = $1", task_id))


async def audit_rows(url: str) -> list[Any]:
    return await db.query(url, "SELECT * FROM audit_log ORDER BY id")


async def test_read_only_without_a_token(read_only_web: Web) -> None:
    [task_id] = await insert_tasks(read_only_web.url, [{"status": "pending"}])
    page = (await read_only_web.get(f"/tasks/{task_id}")).text
    assert "read-only" in page
    assert 'id="cancel"' not in page
    response = await read_only_web.post(f"/tasks/{task_id}/cancel", {"csrf": "x"})
    assert response.status_code == 403
    assert "read-only" in response.text
    login = await read_only_web.post("/login", {"name": "ada", "token": "anything-at-all-x"})
    assert login.status_code == 403
    assert await status_of(read_only_web.url, task_id) == "pending"
    assert await audit_rows(read_only_web.url) == []


async def test_sign_in_needs_the_token_and_sets_a_strict_http_only_cookie(web: Web) -> None:
    wrong = await web.post("/login", {"name": "ada", "token": "not-the-token-at-all"})
    assert wrong.status_code == 403
    assert "set-cookie" not in wrong.headers
    no_name = await web.post("/login", {"name": "", "token": TOKEN})
    assert no_name.status_code == 400
    right = await web.post("/login", {"name": "ada", "token": TOKEN, "next": "//evil.example/"})
    assert right.status_code == 303
    assert right.headers["location"] == "/"  # never redirected off the site
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "signed in as <b>ada</b>" in (await web.get("/tasks")).text


async def test_actions_need_a_session_and_its_csrf_token(web: Web) -> None:
    [task_id] = await insert_tasks(web.url, [{"status": "pending"}])
    signed_out = await web.post(f"/tasks/{task_id}/cancel", {"csrf": "whatever"})
    assert signed_out.status_code == 403
    csrf = await web.sign_in()
    for data, headers in [
        ({}, {}),  # no CSRF token
        ({"csrf": "forged"}, {}),
        ({"csrf": csrf}, {"origin": "http://evil.example"}),
        ({"csrf": csrf}, {"sec-fetch-site": "cross-site"}),
    ]:
        response = await web.post(f"/tasks/{task_id}/cancel", data, headers=headers)
        assert response.status_code == 403, (data, headers)
    assert await status_of(web.url, task_id) == "pending"
    assert await audit_rows(web.url) == []
    # The same request, same-site and with the token, goes through.
    ok = await web.post(
        f"/tasks/{task_id}/cancel", {"csrf": csrf}, headers={"origin": "http://dash.test"}
    )
    assert ok.status_code == 303, ok.text
    assert await status_of(web.url, task_id) == "cancelled"


async def test_a_forged_session_cookie_is_refused(web: Web) -> None:
    [task_id] = await insert_tasks(web.url, [{"status": "pending"}])
    web.http.cookies.set("tasklane_session", "eyJuYW1lIjoiZXZlIn0.forged.sig")
    response = await web.post(f"/tasks/{task_id}/cancel", {"csrf": "x"})
    assert response.status_code == 403
    assert await status_of(web.url, task_id) == "pending"


async def test_cancel_retry_and_edit_one_task_are_audited(web: Web) -> None:
    pending, failed, done = await insert_tasks(
        web.url,
        [{"status": "pending"}, {"status": "failed", "error": "x"}, {"status": "completed"}],
    )
    csrf = await web.sign_in("grace")
    assert (
        await web.post(f"/tasks/{pending}/edit", {"csrf": csrf, "max_attempts": "7"})
    ).status_code == 303
    assert await db.value(web.url, "SELECT max_attempts FROM tasks WHERE id = $1", pending) == 7
    assert (await web.post(f"/tasks/{pending}/cancel", {"csrf": csrf})).status_code == 303
    assert (await web.post(f"/tasks/{failed}/retry", {"csrf": csrf})).status_code == 303
    assert (await web.post(f"/tasks/{done}/cancel", {"csrf": csrf})).status_code == 303
    bad = await web.post(f"/tasks/{failed}/edit", {"csrf": csrf, "run_after": "whenever"})
    assert bad.status_code == 400
    assert await status_of(web.url, pending) == "cancelled"
    assert await status_of(web.url, failed) == "pending"
    assert await status_of(web.url, done) == "completed"
    entries = await audit_rows(web.url)
    assert [(e["actor"], e["action"], e["changed"], e["status"]) for e in entries] == [
        ("grace", "edit", 1, "done"),
        ("grace", "cancel", 1, "done"),
        ("grace", "retry", 1, "done"),
        ("grace", "cancel", 0, "done"),  # already completed: nothing changed, still recorded
    ]
    assert all(e["address"] for e in entries)
    audit_page = (await web.get("/audit")).text
    assert "grace" in audit_page
    assert "already completed" in audit_page
    api = (await web.get("/api/audit")).json()
    assert [e["action"] for e in api] == ["cancel", "retry", "cancel", "edit"]


async def test_bulk_retry_of_everything_the_filter_matches(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preview counts only what the action can change; the run goes in batches and its
    audit entry says how many changed."""
    monkeypatch.setattr(web_app, "BULK_BATCH", 4)
    rows = [{"status": "failed", "error": "flaky upstream"} for _ in range(11)]
    rows += [{"status": "failed", "error": "bad input"} for _ in range(3)]
    rows += [{"status": "completed", "error": None} for _ in range(5)]
    ids = await insert_tasks(web.url, rows)
    csrf = await web.sign_in()
    form = {"csrf": csrf, "do": "retry:filter", "error": "upstream"}
    preview = await web.post("/tasks/bulk", form)
    assert preview.status_code == 200
    assert 'id="bulk-count">11 task' in preview.text
    assert await db.value(web.url, "SELECT count(*) FROM tasks WHERE status = 'failed'") == 14
    confirmed = await web.post("/tasks/bulk", {**form, "confirm": "yes"})
    assert confirmed.status_code == 303

    async def entry() -> Any:
        return (await audit_rows(web.url))[-1]

    done = await db.eventually(entry, lambda e: e["status"] == "done", what="bulk done")
    assert (done["action"], done["matched"], done["changed"]) == ("bulk retry", 11, 11)
    assert done["target"] == {"filter": {"status": "failed", "error": "upstream"}}
    statuses = [await status_of(web.url, i) for i in ids]
    assert statuses == ["pending"] * 11 + ["failed"] * 3 + ["completed"] * 5


async def test_bulk_cancel_of_selected_tasks(web: Web) -> None:
    ids = await insert_tasks(
        web.url, [{"status": "pending"}, {"status": "waiting"}, {"status": "completed"}]
    )
    csrf = await web.sign_in()
    form: dict[str, Any] = {"csrf": csrf, "do": "cancel:selected", "ids": [str(i) for i in ids]}
    preview = await web.post("/tasks/bulk", form)
    assert 'id="bulk-count">2 task' in preview.text  # the completed one cannot be cancelled
    await web.post("/tasks/bulk", {**form, "confirm": "yes"})
    await db.eventually(
        lambda: audit_rows(web.url), lambda es: es and es[-1]["status"] == "done", what="done"
    )
    assert [await status_of(web.url, i) for i in ids] == ["cancelled", "cancelled", "completed"]
    assert (await audit_rows(web.url))[-1]["changed"] == 2


def test_the_token_is_read_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert read_token({}) is None
    assert read_token({"TASKLANE_WEB_TOKEN": TOKEN}) == TOKEN
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token({"TASKLANE_WEB_TOKEN_FILE": str(path)}) == TOKEN
    for env, fragment in [
        ({"TASKLANE_WEB_TOKEN": "short"}, "at least 16"),
        ({"TASKLANE_WEB_TOKEN": TOKEN, "TASKLANE_WEB_TOKEN_FILE": str(path)}, "keep one"),
        ({"TASKLANE_WEB_TOKEN_FILE": str(tmp_path / "missing")}, "cannot read"),
    ]:
        with pytest.raises(TokenError, match=fragment):
            read_token(env)


async def test_tasklane_web_refuses_with_one_line(
    settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.cli import run_cli
    from tests.support.workers import settings_env

    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TASKLANE_WEB_TOKEN", "short")
    out = await asyncio.to_thread(run_cli, capsys, "web", "--port", "1")
    assert out.code == 1
    assert "at least 16 characters" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    monkeypatch.delenv("TASKLANE_WEB_TOKEN")
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/tasklane_no_such_db")
    monkeypatch.setenv("TASKLANE_STARTUP_WAIT_SECONDS", "1")
    out = await asyncio.to_thread(run_cli, capsys, "web", "--port", "1")
    assert out.code == 1
    assert "does not exist" in out.stderr or "tasklane migrate" in out.stderr, out.explained
    assert len(out.stderr.strip().splitlines()) == 1


async def test_a_bulk_filter_examines_a_bounded_number_of_tasks(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter the indexes cannot answer (error text) searches at most BULK_SCAN tasks, and
    the preview says the search stopped short."""
    from persistence.repositories import dashboard_repository

    monkeypatch.setattr(dashboard_repository, "WINDOW", 5)
    monkeypatch.setattr(web_app, "BULK_SCAN", 10)
    rows = [{"status": "failed", "error": "needle"}]  # the oldest
    rows += [{"status": "failed", "error": "hay"} for _ in range(20)]
    await insert_tasks(web.url, rows)
    csrf = await web.sign_in()
    preview = await web.post("/tasks/bulk", {"csrf": csrf, "do": "retry:filter", "error": "needle"})
    assert 'id="bulk-count">0 task' in preview.text
    assert 'id="bulk-partial"' in preview.text
    monkeypatch.setattr(web_app, "BULK_SCAN", 100)
    preview = await web.post("/tasks/bulk", {"csrf": csrf, "do": "retry:filter", "error": "needle"})
    assert 'id="bulk-count">1 task' in preview.text
    assert 'id="bulk-partial"' not in preview.text


async def test_an_unknown_action_is_a_404_and_changes_nothing(web: Web) -> None:
    [task_id] = await insert_tasks(web.url, [{"status": "pending"}])
    csrf = await web.sign_in()
    response = await web.post(f"/tasks/{task_id}/delete", {"csrf": csrf, "max_attempts": "2"})
    assert response.status_code == 404
    assert await db.value(web.url, "SELECT max_attempts FROM tasks WHERE id = $1", task_id) == 3
    assert await audit_rows(web.url) == []
