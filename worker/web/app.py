"""`tasklane web`: the dashboard, an ASGI app (Starlette, server-rendered Jinja2 templates).

Every page has a JSON twin under `/api/`. Reads go through `DashboardRepository` (bounded,
index-backed: see its docstring) on a small pool of the dashboard's own, with a short statement
timeout, so that no page can hold the workers' database busy. Actions go through the CLI's
`Operator` (cancel, retry, edit exactly as `tasklane cancel/retry/edit` do them) and are written
to the audit log first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from domain.value_objects import TaskStatus
from persistence.repositories.dashboard_repository import TaskFilter
from persistence.session import UnitOfWork
from worker import cli_render as render
from worker.cli_format import duration
from worker.client import TaskClient
from worker.config import Settings
from worker.operator import Operator, OperatorError
from worker.redaction import redact, redact_text
from worker.web import documents
from worker.web.auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    Access,
    Session,
    cross_site,
    csrf_matches,
    valid_name,
)
from worker.web.params import (
    BadParameter,
    Params,
    cursor,
    encode_cursor,
    filter_query,
    limit,
    task_filter,
    url,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
POOL_SIZE = 2
STATEMENT_SECONDS = 5.0
MAX_API_PAGE = 1000  # `list --json` allows as many
BULK_CAP = 10_000  # tasks one bulk action may change
BULK_SCAN = 100_000  # tasks a bulk action's filter may examine to find them
BULK_BATCH = 200
FAILED_SIGN_IN_PAUSE = 1.0
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
ACTIONS = {
    "cancel": (TaskStatus.PENDING.value, TaskStatus.RUNNING.value, TaskStatus.WAITING.value),
    "retry": (TaskStatus.FAILED.value,),
}


@dataclass
class Dashboard:
    settings: Settings
    access: Access
    client: TaskClient | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)

    @contextlib.asynccontextmanager
    async def operator(self) -> AsyncIterator[Operator]:
        """The CLI's operations, on one of the dashboard's connections (its reads run on the
        driver connection, as the CLI's do; actions go through the dashboard's client)."""
        assert self.client is not None
        async with self.client.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection  # asyncpg's connection under SQLAlchemy's
            yield Operator(self.settings, driver, client=self.client)

    def uow(self) -> UnitOfWork:
        assert self.client is not None
        return UnitOfWork(self.client.session_factory)


def web_settings(settings: Settings) -> Settings:
    """The dashboard's connections: few, and cut short (a page must never hold the database)."""
    return replace(
        settings,
        db_pool_size=POOL_SIZE,
        db_timeout_seconds=min(settings.db_timeout_seconds, STATEMENT_SECONDS),
    )


def create_app(settings: Settings, *, token: str | None) -> Starlette:
    dashboard = Dashboard(web_settings(settings), Access(token))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(duration=duration, render=render, quote=quote)
    templates.env.filters["datetime"] = _parse_time

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dashboard.client = TaskClient.from_settings(dashboard.settings)
        try:
            yield
        finally:
            for job in list(dashboard.background):
                job.cancel()
            await asyncio.gather(*dashboard.background, return_exceptions=True)
            await dashboard.client.close()

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        session = dashboard.access.session(request.cookies.get(SESSION_COOKIE))
        base = {
            "request": request,
            "session": session,
            "read_only": dashboard.access.read_only,
            "csrf": session.csrf if session else "",
        }
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def json_response(
        document: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        return Response(
            render.dumps(redact(document)) + "\n",
            status_code=status,
            media_type="application/json",
            headers=headers,
        )

    # -- pages and their JSON -----------------------------------------------------------------

    async def from_overview(
        request: Request, to_json: Callable[[Any], Any], template: str
    ) -> Response:
        """A page read from the overview's data (the overview itself, queues and agents)."""
        async with dashboard.uow() as uow:
            data = await uow.dashboard.overview()
        document = to_json(data)
        if _wants_json(request):
            return json_response(document)
        return page(request, template, {"o": data, "doc": document})

    async def overview(request: Request) -> Response:
        return await from_overview(request, documents.overview_json, "overview.html")

    async def tasks(request: Request) -> Response:
        api = _wants_json(request)
        params = _query(request)
        try:
            where = task_filter(params)
            after = cursor(params)
            size = limit(params, MAX_API_PAGE if api else 500)
        except BadParameter as exc:
            return _bad(request, str(exc), page)
        async with dashboard.uow() as uow:
            result = await uow.dashboard.tasks(where, after=after, limit=size)
            now = await uow.dashboard.now()
        query = filter_query(where)
        if size != 50:
            query["limit"] = str(size)
        next_url = (
            url(request.url.path, {**query, "after": encode_cursor(result.next)})
            if result.next
            else None
        )
        if api:
            headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else None
            return json_response([render.task_json(r) for r in result.rows], headers=headers)
        return page(
            request,
            "tasks.html",
            {
                "rows": [redact(render.task_json(r)) for r in result.rows],
                "now": now,
                "where": where,
                "query": query,
                "next_url": next_url,
                "result": result,
                "statuses": [s.value for s in TaskStatus],
            },
        )

    async def task(request: Request) -> Response:
        task_id = _task_id(request)
        try:
            async with dashboard.operator() as op:
                report = await op.show(task_id)
        except OperatorError as exc:
            return _not_found(request, str(exc), page)
        document = render.show_json(report)
        if _wants_json(request):
            return json_response(document)
        async with dashboard.uow() as uow:
            counts = await uow.dashboard.child_counts(task_id)
            audit = await uow.audit.recent(limit=20, task=str(task_id))
        return page(
            request,
            "task.html",
            {
                "t": redact(document),
                "row": report.row,
                "history": report.history,
                "now": report.now,
                "child_counts": counts,
                "audit": audit,
                "can_cancel": report.row["status"] in ACTIONS["cancel"],
                "can_retry": report.row["status"] in ACTIONS["retry"],
                "can_edit": report.row["status"] == TaskStatus.PENDING.value,
            },
        )

    async def tree(request: Request) -> Response:
        task_id = _task_id(request)
        try:
            async with dashboard.operator() as op:
                found = await op.tree(task_id)
        except OperatorError as exc:
            return json_response({"error": str(exc)}, status=404)
        return json_response(render.tree_json(found))

    async def children(request: Request) -> Response:
        """One level of the subtask tree, as an HTML fragment (the task page unfolds it)."""
        task_id = _task_id(request)
        async with dashboard.uow() as uow:
            rows = await uow.dashboard.children(task_id)
            counts = await uow.dashboard.child_counts(task_id)
            now = await uow.dashboard.now()
        return page(
            request,
            "children.html",
            {
                "children": [redact(render.task_json(r)) for r in rows],
                "counts": counts,
                "total": sum(counts.values()),
                "now": now,
            },
        )

    async def queues(request: Request) -> Response:
        return await from_overview(request, documents.queues_json, "queues.html")

    async def workers(request: Request) -> Response:
        async with dashboard.uow() as uow:
            lines = await uow.dashboard.workers()
            now = await uow.dashboard.now()
        document = [documents.worker_line_json(w) for w in lines]
        if _wants_json(request):
            return json_response(document)
        return page(request, "workers.html", {"workers": lines, "now": now})

    async def audit(request: Request) -> Response:
        async with dashboard.uow() as uow:
            entries = await uow.audit.recent(limit=200)
            now = await uow.dashboard.now()
        if _wants_json(request):
            return json_response([documents.audit_json(e) for e in entries])
        return page(request, "audit.html", {"entries": entries, "now": now})

    # -- signing in -------------------------------------------------------------------------

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page(request, "login.html", {"error": None})
        refused = _refused_cross_site(request)
        if refused:
            return _forbidden(request, refused, page)
        form = await request.form()
        if dashboard.access.read_only:
            return _forbidden(request, "read-only: set TASKLANE_WEB_TOKEN to allow actions", page)
        name = valid_name(str(form.get("name") or ""))
        if not dashboard.access.token_matches(str(form.get("token") or "")):
            await asyncio.sleep(FAILED_SIGN_IN_PAUSE)  # slows down guessing
            return page(request, "login.html", {"error": "wrong token"}, status=403)
        if name is None:
            error = "give your name (letters, digits, spaces, . @ + -; at most 64)"
            return page(request, "login.html", {"error": error}, status=400)
        _, cookie = dashboard.access.new_session(name)
        response = RedirectResponse(_local(str(form.get("next") or "/")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        checked = await _checked_form(request)
        if isinstance(checked, Response):
            return checked
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- actions ------------------------------------------------------------------------------

    async def _checked_form(request: Request) -> tuple[Session, FormData] | Response:
        """The signed-in session and the form of a state-changing request, or the refusal."""
        refused = _refused_cross_site(request)
        if refused:
            return _forbidden(request, refused, page)
        if dashboard.access.read_only:
            return _forbidden(request, "read-only: set TASKLANE_WEB_TOKEN to allow actions", page)
        session = dashboard.access.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return _forbidden(request, "sign in first", page)
        form = await request.form()
        offered = form.get("csrf")
        if not csrf_matches(session, offered if isinstance(offered, str) else None):
            return _forbidden(request, "the form is stale or forged (CSRF check failed)", page)
        return session, form

    async def act(request: Request) -> Response:
        checked = await _checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        task_id = _task_id(request)
        verb = request.path_params["verb"]
        if verb not in ("cancel", "retry", "edit"):
            return _not_found(request, f"no such action: {verb[:40]!r}", page)
        try:
            async with dashboard.operator() as op:
                if verb == "cancel":
                    result = await op.cancel(task_id)
                elif verb == "retry":
                    result = await op.retry(task_id)
                else:
                    edit = _edit_arguments(form, await _db_now())
                    result = await op.edit(task_id, **edit)
        except BadParameter as exc:
            return _bad(request, str(exc), page)
        except OperatorError as exc:
            return _not_found(request, str(exc), page)
        except Exception as exc:  # a refused edit (started, version moved): one line
            await _audit(request, session, verb, {"ids": [str(task_id)]}, 1, 0, "failed", exc)
            return _bad(request, redact_text(f"{verb} refused: {exc}"), page, status=409)
        await _audit(
            request,
            session,
            verb,
            {"ids": [str(task_id)]},
            1,
            int(result.changed),
            "done",
            result.message,
        )
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    async def _db_now() -> Any:
        async with dashboard.uow() as uow:
            return await uow.dashboard.now()

    async def _audit(
        request: Request,
        session: Session,
        action: str,
        target: Any,
        matched: int,
        changed: int,
        status: str,
        detail: Any,
    ) -> int:
        async with dashboard.uow() as uow:
            entry = await uow.audit.record(
                actor=session.name,
                address=request.client.host if request.client else None,
                action=action,
                target=target,
                matched=matched,
                changed=changed,
                status=status,
                detail=redact_text(str(detail)) if detail is not None else None,
            )
            await uow.commit()
        return entry.id

    async def bulk(request: Request) -> Response:
        """Bulk cancel or retry: first a preview with the count, then (confirmed) the action,
        run in the background in batches, its audit entry updated batch by batch."""
        checked = await _checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        verb, _, scope = str(form.get("do") or "").partition(":")
        if verb not in ACTIONS or scope not in ("selected", "filter"):
            return _bad(request, "the action must be cancel or retry, on selected or filter", page)
        params = Params(lambda k: _str(form.get(k)), lambda k: list(form.getlist(k)))
        try:
            where = task_filter(params).restricted_to(ACTIONS[verb])
            ids = [UUID(str(i)) for i in form.getlist("ids")] if scope == "selected" else []
        except (BadParameter, ValueError) as exc:
            return _bad(request, str(exc), page)
        if scope == "selected" and not ids:
            return _bad(request, "no task selected", page)
        if scope == "selected":
            async with dashboard.uow() as uow:
                rows = await uow.dashboard.rows(ids[:BULK_CAP])
            ids = [r["id"] for r in rows if r["status"] in ACTIONS[verb]]
        else:
            ids, searched_all = await _matching_ids(where)
        target: dict[str, Any] = (
            {"ids": [str(i) for i in ids]}
            if scope == "selected"
            else {"filter": filter_query(where)}
        )
        if form.get("confirm") != "yes":
            return page(
                request,
                "confirm.html",
                {
                    "verb": verb,
                    "scope": scope,
                    "count": len(ids),
                    "capped": len(ids) >= BULK_CAP,
                    "partial": scope == "filter" and not searched_all and len(ids) < BULK_CAP,
                    "scan": BULK_SCAN,
                    "ids": ids,
                    "query": filter_query(task_filter(params)),
                    "target": target,
                },
            )
        entry_id = await _audit(
            request, session, f"bulk {verb}", target, len(ids), 0, "running", None
        )
        job = asyncio.create_task(_run_bulk(entry_id, verb, ids))
        dashboard.background.add(job)
        job.add_done_callback(dashboard.background.discard)
        return RedirectResponse(f"/audit#entry-{entry_id}", status_code=303)

    async def _matching_ids(where: TaskFilter) -> tuple[list[UUID], bool]:
        """The tasks the filter matches (at most BULK_CAP), page by page, examining at most
        BULK_SCAN tasks (a filter the indexes cannot answer must not read the whole table);
        and whether the search reached the end."""
        ids: list[UUID] = []
        after = None
        examined = 0
        while len(ids) < BULK_CAP and examined < BULK_SCAN:
            async with dashboard.uow() as uow:
                result = await uow.dashboard.tasks(where, after=after, limit=500)
            ids.extend(r["id"] for r in result.rows)
            examined += result.examined
            if result.next is None:
                return ids[:BULK_CAP], True
            after = result.next
        return ids[:BULK_CAP], False

    async def _run_bulk(entry_id: int, verb: str, ids: list[UUID]) -> None:
        try:
            for start in range(0, len(ids), BULK_BATCH):
                changed = 0
                async with dashboard.operator() as op:
                    for task_id in ids[start : start + BULK_BATCH]:
                        try:
                            action = op.cancel if verb == "cancel" else op.retry
                            result = await action(task_id)
                        except OperatorError:  # deleted meanwhile (pruned)
                            continue
                        changed += int(result.changed)
                async with dashboard.uow() as uow:
                    await uow.audit.progress(entry_id, changed=changed)
                    await uow.commit()
            async with dashboard.uow() as uow:
                await uow.audit.progress(entry_id, changed=0, status="done")
                await uow.commit()
        except BaseException as exc:
            reason = "interrupted" if isinstance(exc, asyncio.CancelledError) else str(exc)
            log.warning("bulk action %s failed: %s", entry_id, reason)
            with contextlib.suppress(Exception):
                async with dashboard.uow() as uow:
                    await uow.audit.progress(
                        entry_id, changed=0, status="failed", detail=redact_text(reason)
                    )
                    await uow.commit()
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if _wants_json(request):
            return json_response({"error": exc.detail}, status=exc.status_code)
        return page(request, "error.html", {"message": exc.detail}, status=exc.status_code)

    routes = [
        Route("/", overview),
        Route("/api/overview", overview),
        Route("/tasks", tasks),
        Route("/api/tasks", tasks),
        Route("/tasks/bulk", bulk, methods=["POST"]),
        Route("/tasks/{id}", task),
        Route("/api/tasks/{id}", task),
        Route("/api/tasks/{id}/tree", tree),
        Route("/tasks/{id}/children", children),
        Route("/tasks/{id}/{verb:str}", act, methods=["POST"]),
        Route("/queues", queues),
        Route("/api/queues", queues),
        Route("/workers", workers),
        Route("/api/workers", workers),
        Route("/audit", audit),
        Route("/api/audit", audit),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: on_http_error}
    )
    app.state.dashboard = dashboard
    app.add_middleware(_SecurityHeaders)
    return app


class _SecurityHeaders:
    """Content-Security-Policy (no inline script or style anywhere) and friends on every answer."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- helpers --------------------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _query(request: Request) -> Params:
    q = request.query_params
    return Params(q.get, q.getlist)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _task_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["id"])
    except ValueError:
        raise HTTPException(404, "not a task id (expected a UUID)") from None


def _local(target: str) -> str:
    """A redirect target within this site only."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _refused_cross_site(request: Request) -> str | None:
    host = request.headers.get("host", "")
    return cross_site(request.headers, request.url.scheme, host)


def _bad(request: Request, message: str, page: Any, status: int = 400) -> Response:
    if _wants_json(request):
        return Response(
            render.dumps({"error": message}) + "\n", status, media_type="application/json"
        )
    result: Response = page(request, "error.html", {"message": message}, status)
    return result


def _not_found(request: Request, message: str, page: Any) -> Response:
    return _bad(request, message, page, status=404)


def _forbidden(request: Request, message: str, page: Any) -> Response:
    return _bad(request, message, page, status=403)


def _edit_arguments(form: FormData, now: Any) -> dict[str, Any]:
    """`tasklane edit`'s options from the task page's form (empty fields stay as they are)."""
    from argparse import ArgumentTypeError
    from datetime import timedelta

    from worker.cli import _when
    from worker.client import UNSET

    run_after: Any = UNSET
    raw = (_str(form.get("run_after")) or "").strip()
    if raw:
        try:
            when = _when(raw)
        except ArgumentTypeError as exc:
            raise BadParameter(f"run after: {exc}") from None
        run_after = None if when == "now" else now + when if isinstance(when, timedelta) else when
    max_attempts: Any = UNSET
    raw = (_str(form.get("max_attempts")) or "").strip()
    if raw:
        try:
            max_attempts = int(raw)
        except ValueError:
            raise BadParameter(f"max attempts must be a whole number: {raw[:40]!r}") from None
    if run_after is UNSET and max_attempts is UNSET:
        raise BadParameter("nothing to edit: give a run-after time and/or max attempts")
    version = (_str(form.get("version")) or "").strip()
    return {
        "run_after": run_after,
        "max_attempts": max_attempts,
        "metadata": UNSET,
        "expected_version": int(version) if version.isdigit() else None,
    }
