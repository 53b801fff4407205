"""The operator console at /console: server-rendered pages over the same data as /api."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func, select
from sqlalchemy.orm import defer
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bot.domain.states import ProtocolStatus
from bot.storage import sessions
from bot.storage.models import Project, ProtocolRun, WebhookDelivery
from bot.web.api.core import (
    CONSOLE_COOKIE,
    CONSOLE_HEADER,
    MAX_ID,
    PROTOCOL_STATUSES,
    Access,
    authenticate,
    delivery_json,
    project_json,
    run_json,
)
from bot.web.api.queues import queue_snapshot
from bot.web.api.run_actions import ACTIONS

TEMPLATES = Path(__file__).parent / "templates" / "console"
Page = Callable[[Request], Awaitable[Response]]
PAGE_SIZE = 50
# which buttons a run page offers, by run status (the API still guards every transition)
BUTTONS: dict[str, tuple[str, ...]] = {
    ProtocolStatus.PENDING: ("start", "cancel"),
    ProtocolStatus.PLANNING: ("cancel",),
    ProtocolStatus.PLANNED: ("approve", "run", "open_pr", "cancel"),
    ProtocolStatus.RUNNING: ("run", "run_qa", "rerun", "pause", "open_pr", "cancel"),
    ProtocolStatus.PAUSED: ("resume", "cancel"),
    ProtocolStatus.BLOCKED: ("approve", "rerun", "resume", "cancel"),
    ProtocolStatus.FAILED: ("start", "rerun", "cancel"),
    ProtocolStatus.COMPLETED: ("open_pr",),
    ProtocolStatus.CANCELLED: (),
}
LABELS = {
    "start": "Start planning",
    "approve": "Approve",
    "run": "Run next step",
    "run_qa": "Run QA",
    "rerun": "Rerun step",
    "pause": "Pause",
    "resume": "Resume",
    "cancel": "Cancel",
    "open_pr": "Open draft PR",
}
assert set(LABELS) == set(ACTIONS)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(labels=LABELS, console_header=CONSOLE_HEADER)
    return env


def _env(request: Request) -> Environment:
    extra: dict[str, Any] = request.app.state.df.extra
    env = extra.get("console_env")
    if env is None:
        env = extra["console_env"] = _environment()
    assert isinstance(env, Environment)
    return env


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    html = _env(request).get_template(template).render(request_path=request.url.path, **values)
    return HTMLResponse(html, status_code=status_code)


def login_page(request: Request, status_code: int, error: str | None) -> HTMLResponse:
    settings = request.app.state.df.settings
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if not target.startswith("/console") or target.startswith("/console/log"):
        target = "/console"
    return render(
        request,
        "login.html",
        status_code,
        error=error,
        next=target,
        hide_signout=True,
        ttl_hours=round(settings.console_session_ttl_s / 3600, 1),
    )


def _safe_next(value: str) -> str:
    """Only a console path of this server: never an open redirect to another site."""
    if value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console"


async def _form(request: Request) -> dict[str, str]:
    raw = await request.body()
    if len(raw) > 8192:
        return {}
    return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}


async def login(request: Request) -> Response:
    """Sign in by POST: the API token is exchanged for a random server-side session."""
    if request.method == "GET":
        return login_page(request, 200, None)
    state = request.app.state.df
    api_token = state.settings.api_token.get_secret_value() if state.settings.api_token else None
    form = await _form(request)
    given = form.get("token", "")
    if not api_token or not hmac.compare_digest(given.encode(), api_token.encode()):
        return render(
            request,
            "login.html",
            401,
            error="wrong token",
            next=_safe_next(form.get("next", "")),
            hide_signout=True,
            ttl_hours=round(state.settings.console_session_ttl_s / 3600, 1),
        )
    session_id = await sessions.create(
        state.db, sessions.CONSOLE, state.settings.console_session_ttl_s
    )
    response = RedirectResponse(_safe_next(form.get("next", "")), status_code=303)
    response.set_cookie(
        CONSOLE_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=_https(request),
        max_age=int(state.settings.console_session_ttl_s),
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    """Sign out: the session is deleted on the server, so a copied cookie stops working too."""
    cookie = request.cookies.get(CONSOLE_COOKIE)
    if cookie:
        await sessions.revoke(request.app.state.df.db, sessions.CONSOLE, cookie)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(
        CONSOLE_COOKIE, path="/", httponly=True, samesite="strict", secure=_https(request)
    )
    return response


def _https(request: Request) -> bool:
    # behind a trusted proxy uvicorn has already set the scheme from X-Forwarded-Proto
    return request.url.scheme == "https"


def console_page(page: Page) -> Page:
    """Console auth: the session cookie from POST /console/login (the API accepts it too)."""

    async def wrapper(request: Request) -> Response:
        if "token" in request.query_params:
            # a token in a URL ends up in histories and proxy logs: it is never accepted there
            return login_page(
                request, 400, "sign in with the form; a token in the address is refused"
            )
        access = await authenticate(request)
        if not isinstance(access, Access):
            return login_page(request, access.status_code, None)
        if not access.admin:
            return login_page(request, 403, "the console needs the API token")
        try:
            return await page(request)
        except LookupError as exc:
            return render(request, "error.html", 404, message=str(exc))
        except ValueError as exc:
            return render(request, "error.html", 400, message=str(exc))

    wrapper.__name__ = page.__name__
    return wrapper


def _db(request: Request) -> Any:
    return request.app.state.df.db


def _id(request: Request, name: str) -> int:
    value = int(request.path_params[name])
    if value > MAX_ID:
        raise LookupError(f"{name} {value} does not exist")
    return value


def _offset(request: Request) -> int:
    raw = request.query_params.get("offset", "0") or "0"
    if not raw.isdigit():
        raise ValueError("offset must be a non-negative integer")
    return min(int(raw), 10**7)


@console_page
async def index(request: Request) -> Response:
    async with _db(request).sessions() as session:
        projects = list(
            (await session.execute(select(Project).order_by(Project.id).limit(200))).scalars()
        )
        runs = list(
            (
                await session.execute(select(ProtocolRun).order_by(ProtocolRun.id.desc()).limit(20))
            ).scalars()
        )
        counts = dict(
            (
                await session.execute(
                    select(ProtocolRun.project_id, func.count()).group_by(ProtocolRun.project_id)
                )
            ).all()
        )
    names = {p.id: p.name for p in projects}
    return render(
        request,
        "index.html",
        projects=[{**project_json(p), "runs": counts.get(p.id, 0)} for p in projects],
        runs=[run_json(r) for r in runs],
        names=names,
    )


@console_page
async def project_page(request: Request) -> Response:
    project_id = _id(request, "project_id")
    async with _db(request).sessions() as session:
        project = await session.get(Project, project_id)
        if project is None:
            raise LookupError(f"project {project_id} does not exist")
        runs = list(
            (
                await session.execute(
                    select(ProtocolRun)
                    .where(ProtocolRun.project_id == project_id)
                    .order_by(ProtocolRun.id.desc())
                    .limit(PAGE_SIZE)
                )
            ).scalars()
        )
    return render(
        request,
        "project.html",
        project=project_json(project),
        runs=[run_json(r) for r in runs],
        names={project.id: project.name},
    )


@console_page
async def protocols_page(request: Request) -> Response:
    offset = _offset(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in PROTOCOL_STATUSES:
        raise ValueError(f"status must be one of {', '.join(PROTOCOL_STATUSES)}")
    query = select(ProtocolRun)
    if status:
        query = query.where(ProtocolRun.status == status)
    async with _db(request).sessions() as session:
        runs = list(
            (
                await session.execute(
                    query.order_by(ProtocolRun.id.desc()).limit(PAGE_SIZE + 1).offset(offset)
                )
            ).scalars()
        )
        ids = {r.project_id for r in runs}
        names = (
            dict(
                (
                    await session.execute(
                        select(Project.id, Project.name).where(Project.id.in_(ids))
                    )
                ).all()
            )
            if ids
            else {}
        )
    return render(
        request,
        "protocols.html",
        runs=[run_json(r) for r in runs[:PAGE_SIZE]],
        names=names,
        status=status,
        statuses=PROTOCOL_STATUSES,
        offset=offset,
        more=len(runs) > PAGE_SIZE,
        page_size=PAGE_SIZE,
    )


@console_page
async def deliveries_page(request: Request) -> Response:
    before_raw = request.query_params.get("before") or ""
    if before_raw and not before_raw.isdigit():
        raise ValueError("before must be a non-negative integer")
    query = select(WebhookDelivery).options(defer(WebhookDelivery.payload))
    if before_raw:
        query = query.where(WebhookDelivery.id < int(before_raw))
    async with _db(request).sessions() as session:
        rows = list(
            (
                await session.execute(query.order_by(WebhookDelivery.id.desc()).limit(PAGE_SIZE))
            ).scalars()
        )
    return render(
        request,
        "deliveries.html",
        deliveries=[delivery_json(d) for d in rows],
        next_before=rows[-1].id if len(rows) == PAGE_SIZE else None,
    )


@console_page
async def queue_page(request: Request) -> Response:
    error = None
    snapshot: dict[str, Any] = {"depth": None, "in_progress": None, "failed": None, "jobs": {}}
    try:
        snapshot = await queue_snapshot(request.app.state.df.redis)
    except Exception as exc:  # an unreachable Redis is something to show, not a crash
        error = f"queue unreachable: {type(exc).__name__}"
    return render(request, "queue.html", queue=snapshot, error=error)


def console_routes() -> list[BaseRoute]:
    return [
        Route("/console", index),
        Route("/console/login", login, methods=["GET", "POST"]),
        Route("/console/logout", logout, methods=["POST"]),
        Route("/console/projects/{project_id:int}", project_page),
        Route("/console/protocols", protocols_page),
        Route("/console/deliveries", deliveries_page),
        Route("/console/queue", queue_page),
    ]
