"""Serve the dashboard with uvicorn (what `tasklane web` runs)."""

from __future__ import annotations

import uvicorn

from worker.config import Settings
from worker.web.app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def serve(settings: Settings, *, token: str | None, host: str, port: int) -> None:
    """Run until SIGTERM or Ctrl-C. Forwarded headers are trusted from 127.0.0.1 only (a proxy
    on the same host)."""
    app = create_app(settings, token=token)
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
    )
