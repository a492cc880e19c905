"""The dashboard's web app (Starlette, server-sent events) and how it is served (uvicorn).

    GET /            the page (static HTML + JS; every value is inserted as text, never as HTML)
    GET /api/runs    every run's snapshot (JSON)
    GET /events      server-sent events: a snapshot of every run whenever one of them changes

Bound to 127.0.0.1 unless told otherwise; bound to any other address it needs a token (sent as
``?token=`` or ``Authorization: Bearer``) and TLS (``--cert`` / ``--key``), and refuses to start
without them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("page.html")


class DashboardError(ValueError):
    """A dashboard that must not start as asked (the message says what to add)."""


def check_binding(host: str, token: str | None, cert: str | None, key: str | None) -> None:
    if host in LOOPBACK:
        return
    missing = [what for what, v in (("--token", token), ("--cert", cert), ("--key", key)) if not v]
    if missing:
        raise DashboardError(
            f"the dashboard bound to {host} (not loopback) needs a token and TLS: add {', '.join(missing)}"
        )


def first_paint(runs: list[dict]) -> str:
    """The page with the runs' current state inside it, so the first paint shows them (a plain
    ``chromium --headless --screenshot`` too) before any server-sent event arrives. The JSON sits in
    a ``<script type="application/json">``; ``<`` is escaped so no value can close that element."""
    import json

    state = json.dumps(runs).replace("<", "\\u003c")
    return PAGE.read_text().replace("/*INITIAL*/[]", state)


def create_app(run_dirs, token: str | None = None, poll_s: float = 0.5):
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from fedfm.reporting.dashboard.state import RunView

    views = [RunView(d) for d in run_dirs]

    def allowed(request) -> bool:
        if token is None:
            return True
        given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        return hmac.compare_digest(given.encode(), token.encode())

    def refused():
        return PlainTextResponse("a token is required (?token=...)", status_code=401)

    def snapshots() -> list[dict]:
        for v in views:
            v.poll()
        return [v.snapshot() for v in views]

    async def page(request):
        if not allowed(request):
            return refused()
        return HTMLResponse(first_paint(snapshots()), headers={"Cache-Control": "no-store"})

    async def runs(request):
        return JSONResponse(snapshots()) if allowed(request) else refused()

    async def events(request):
        if not allowed(request):
            return refused()

        async def stream():
            last = None
            while True:
                if await request.is_disconnected():
                    break
                data = json.dumps(snapshots())
                if data != last:
                    last = data
                    yield {"event": "runs", "data": data}
                await asyncio.sleep(poll_s)

        return EventSourceResponse(stream(), ping=15)

    routes = [Route("/", page), Route("/api/runs", runs), Route("/events", events)]
    return Starlette(routes=routes)


def make_server(run_dirs, host="127.0.0.1", port=8765, token=None, cert=None, key=None):
    import uvicorn

    check_binding(host, token, cert, key)
    app = create_app(run_dirs, token)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", ssl_certfile=cert, ssl_keyfile=key, lifespan="off"
    )
    return uvicorn.Server(config)


def serve_in_thread(run_dirs, host="127.0.0.1", port=8765, token=None, cert=None, key=None):
    """Start the dashboard beside a server's run (``fedfm server --dashboard``); → the uvicorn server
    (``should_exit = True`` stops it)."""
    server = make_server(run_dirs, host, port, token, cert, key)
    threading.Thread(target=server.run, daemon=True, name="fedfm-dashboard").start()
    return server
