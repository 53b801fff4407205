"""Console delivery details and redelivery, `/`, the favicon and the styled server error page."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bot.storage.models import Event, WebhookDelivery
from bot.storage.queue import JobSpec, enqueue_many
from bot.storage.runs import record_event
from bot.web.api.core import CONSOLE_COOKIE, CONSOLE_HEADER, MAX_ID, delivery_json, event_json
from bot.web.console import console_page, render
from bot.web.console_steps import _db, _int, _stream_access

# headers worth showing from a stored delivery; everything else (signatures, tokens) stays out
SAFE_HEADERS = (
    "x-github-event", "x-github-delivery", "x-github-hook-id",
    "x-github-hook-installation-target-id", "x-github-hook-installation-target-type",
    "x-gitlab-event", "x-gitlab-event-uuid",
    "x-gitlab-instance", "x-gitlab-webhook-uuid", "idempotency-key", "user-agent", "content-type",
    "content-length",
)  # fmt: skip


def safe_headers(headers: dict[str, Any]) -> dict[str, str]:
    """The headers of a stored delivery that are safe to show (no signatures or tokens)."""
    return {k: str(v)[:500] for k, v in sorted(headers.items()) if k.lower() in SAFE_HEADERS}


@console_page
async def delivery_page(request: Request) -> Response:
    delivery_id = _int(request, "delivery_id")
    async with _db(request).sessions() as session:
        row = await session.get(WebhookDelivery, delivery_id)
        if row is None:
            raise LookupError(f"delivery {delivery_id} does not exist")
        events = list(
            (await session.execute(
                select(Event).where(Event.delivery_id == delivery_id).order_by(Event.id).limit(100)
            )).scalars()
        )  # fmt: skip
    return render(
        request,
        "delivery.html",
        d=delivery_json(row),
        headers=safe_headers(dict(row.headers or {})),
        hidden=sorted(k for k in (row.headers or {}) if k.lower() not in SAFE_HEADERS),
        payload_bytes=len(row.payload or ""),
        job_id=f"delivery:{row.id}",
        events=[event_json(e) for e in events],
    )


async def redeliver(request: Request) -> Response:
    """POST /api/deliveries/{id}/redeliver: run a stored delivery's handlers again."""
    refused = await _stream_access(request)
    if refused is not None:
        return refused

    # a cookie-authenticated write must come from our own page (CSRF), like the API's actions
    by_cookie = "authorization" not in request.headers and bool(request.cookies.get(CONSOLE_COOKIE))
    if by_cookie and not request.headers.get(CONSOLE_HEADER):
        return JSONResponse({"error": f"missing {CONSOLE_HEADER} header"}, status_code=403)
    delivery_id = int(request.path_params["delivery_id"])
    if delivery_id > MAX_ID:
        return JSONResponse({"error": f"delivery {delivery_id} does not exist"}, status_code=404)
    db = _db(request)
    async with db.sessions.begin() as session:
        done = await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status != "processing")
            .values(status="pending", processed_at=None, error=None)
        )
        changed = bool(getattr(done, "rowcount", 0))
    if not changed:
        async with db.sessions() as session:
            exists = await session.get(WebhookDelivery, delivery_id) is not None
        if not exists:
            return JSONResponse(
                {"error": f"delivery {delivery_id} does not exist"}, status_code=404
            )
        return JSONResponse(
            {"error": "the delivery is being processed right now", "current": "processing"},
            status_code=409,
        )
    job_id = f"delivery:{delivery_id}:again:{time.time_ns()}"
    await enqueue_many(
        request.app.state.df.redis,
        [JobSpec("process_delivery", job_id, {"delivery_id": delivery_id})],
    )
    await record_event(
        db, "delivery.redelivered", "redelivered from the console", delivery_id=delivery_id
    )
    return JSONResponse(
        {"delivery": delivery_id, "job_id": job_id, "status": "pending"}, status_code=202
    )


FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="7" fill="#24292f"/>'
    '<path d="M9 8h7a8 8 0 0 1 0 16H9z" fill="none" stroke="#3fb950" stroke-width="3"/>'
    '<circle cx="22" cy="16" r="2.5" fill="#58a6ff"/></svg>'
)


async def root(request: Request) -> Response:
    return RedirectResponse("/console", status_code=307)


async def favicon(request: Request) -> Response:
    return Response(
        FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"}
    )


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug answers a styled one-line page (or JSON for the API), never a traceback."""
    if request.url.path.startswith("/console"):
        try:
            return render(
                request,
                "error.html",
                500,
                message="Something went wrong on our side; the error is in the server log.",
            )
        except Exception:  # the template itself may be what broke
            pass
    if request.url.path.startswith("/api") or "html" not in request.headers.get("accept", ""):
        return JSONResponse({"error": "internal server error"}, status_code=500)
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8><title>Error · DeksdenFlow</title>"
        '<body style="font:15px system-ui;margin:15vh auto;max-width:560px;color:#1f2328">'
        "<h1 style=font-size:20px>DeksdenFlow hit an error</h1>"
        "<p>Something went wrong on our side; the error is in the server log.</p>"
        '<p><a href="/console">Back to the console</a></p>',
        status_code=500,
    )


def delivery_routes() -> list[BaseRoute]:
    return [
        Route("/", root),
        Route("/favicon.ico", favicon),
        Route("/console/deliveries/{delivery_id:int}", delivery_page),
    ]
