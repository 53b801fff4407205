"""Operator REST API under /api: projects, protocol runs, steps, events, deliveries, actions."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.errors import DeksdenFlowError, NotFound, TransitionConflict
from bot.models import Event, Project, ProtocolRun, StepRun, WebhookDelivery

LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}
Endpoint = Callable[[Request], Awaitable[Response]]


def _state(request: Request) -> Any:
    return request.app.state.df


def guarded(endpoint: Endpoint) -> Endpoint:
    """Bearer DEKSDENFLOW_API_TOKEN; with no token configured, only loopback clients get in."""

    async def wrapper(request: Request) -> Response:
        settings = _state(request).settings
        token = settings.api_token.get_secret_value() if settings.api_token else None
        if token:
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(
                given[7:].encode(), token.encode()
            ):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        elif (request.client.host if request.client else "") not in LOOPBACK:
            return JSONResponse(
                {"error": "set DEKSDENFLOW_API_TOKEN to use the API remotely"}, status_code=403
            )
        try:
            return await endpoint(request)
        except TransitionConflict as exc:
            return JSONResponse({"error": str(exc), "current": exc.current}, status_code=409)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except (ValueError, DeksdenFlowError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapper


def _int_param(
    request: Request, name: str, default: int | None = None, maximum: int = 500
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValueError(f"query parameter {name} must be a non-negative integer")
    return min(int(raw), maximum)


def project_json(p: Project) -> dict[str, Any]:
    # secrets are write-only: never returned
    return {
        "id": p.id,
        "name": p.name,
        "provider": p.provider,
        "git_url": p.git_url,
        "base_branch": p.base_branch,
        "ci_provider": p.ci_provider,
        "default_models": p.default_models,
        "enabled": p.enabled,
        "installation_id": p.installation_id,
        "forge_id": p.forge_id,
    }


def run_json(r: ProtocolRun) -> dict[str, Any]:
    return {
        "id": r.id,
        "project_id": r.project_id,
        "protocol_name": r.protocol_name,
        "status": r.status,
        "base_branch": r.base_branch,
        "description": r.description,
        "issue_number": r.issue_number,
        "pr_number": r.pr_number,
        "pr_url": r.pr_url,
        "head_sha": r.head_sha,
        "approved": r.approved,
        "auto_mode": r.auto_mode,
        "tokens_used": r.tokens_used,
        "template_source": r.template_source,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }


def step_json(s: StepRun) -> dict[str, Any]:
    rs = s.runtime_state or {}
    return {
        "id": s.id,
        "step_index": s.step_index,
        "step_name": s.step_name,
        "status": s.status,
        "retries": s.retries,
        "engine_id": s.engine_id,
        "model": s.model,
        "summary": s.summary,
        "tokens_used": s.tokens_used,
        "qa_verdict": rs.get("qa_verdict"),
        "commit_sha": rs.get("commit_sha"),
    }


def event_json(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "event_type": e.event_type,
        "message": e.message,
        "project_id": e.project_id,
        "protocol_run_id": e.protocol_run_id,
        "step_run_id": e.step_run_id,
        "delivery_id": e.delivery_id,
        "created_at": e.created_at.isoformat(),
    }


@guarded
async def list_projects(request: Request) -> Response:
    async with _state(request).db.sessions() as session:
        rows = (await session.execute(select(Project).order_by(Project.id).limit(500))).scalars()
        return JSONResponse({"items": [project_json(p) for p in rows]})


@guarded
async def list_protocols(request: Request) -> Response:
    limit = _int_param(request, "limit", 50, 200) or 50
    offset = _int_param(request, "offset", 0, 10**9) or 0
    query = select(ProtocolRun)
    count = select(func.count()).select_from(ProtocolRun)
    project_id = _int_param(request, "project_id", None, 10**9)
    status = request.query_params.get("status")
    if project_id is not None:
        query, count = (
            query.where(ProtocolRun.project_id == project_id),
            count.where(ProtocolRun.project_id == project_id),
        )
    if status:
        query, count = (
            query.where(ProtocolRun.status == status),
            count.where(ProtocolRun.status == status),
        )
    async with _state(request).db.sessions() as session:
        total = (await session.execute(count)).scalar()
        rows = (
            await session.execute(query.order_by(ProtocolRun.id.desc()).limit(limit).offset(offset))
        ).scalars()
        return JSONResponse(
            {"items": [run_json(r) for r in rows], "total": total, "limit": limit, "offset": offset}
        )


@guarded
async def get_protocol(request: Request) -> Response:
    run_id = int(request.path_params["run_id"])
    async with _state(request).db.sessions() as session:
        run = await session.get(ProtocolRun, run_id)
        if run is None:
            raise NotFound(f"protocol run {run_id} does not exist")
        steps = (
            await session.execute(
                select(StepRun)
                .where(StepRun.protocol_run_id == run_id)
                .order_by(StepRun.step_index)
            )
        ).scalars()
        return JSONResponse({**run_json(run), "steps": [step_json(s) for s in steps]})


@guarded
async def list_events(request: Request) -> Response:
    limit = _int_param(request, "limit", 100, 500) or 100
    after = _int_param(request, "after", None, 10**15)
    query = select(Event)
    for name, column in (
        ("project_id", Event.project_id),
        ("protocol_run_id", Event.protocol_run_id),
        ("step_run_id", Event.step_run_id),
    ):
        value = _int_param(request, name, None, 10**12)
        if value is not None:
            query = query.where(column == value)
    if request.query_params.get("type"):
        query = query.where(Event.event_type == request.query_params["type"])
    if after is not None:
        query = query.where(Event.id > after).order_by(Event.id)
    else:
        query = query.order_by(Event.id.desc())
    async with _state(request).db.sessions() as session:
        rows = list((await session.execute(query.limit(limit))).scalars())
    items = [event_json(e) for e in rows]
    cursor = max((e.id for e in rows), default=after)
    return JSONResponse({"items": items, "next_after": cursor})


@guarded
async def list_deliveries(request: Request) -> Response:
    limit = _int_param(request, "limit", 50, 200) or 50
    async with _state(request).db.sessions() as session:
        rows = (
            await session.execute(
                select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
            )
        ).scalars()
        return JSONResponse(
            {
                "items": [
                    {
                        "id": d.id,
                        "provider": d.provider,
                        "delivery": d.delivery_key,
                        "event": d.event,
                        "action": d.action,
                        "status": d.status,
                        "attempts": d.attempts,
                        "outcome": d.outcome,
                        "error": d.error,
                        "received_at": d.received_at.isoformat(),
                    }
                    for d in rows
                ]
            }
        )


ACTIONS = ("approve", "run", "run_qa", "rerun", "pause", "resume", "cancel")


@guarded
async def protocol_action(request: Request) -> Response:
    from bot import actions

    run_id = int(request.path_params["run_id"])
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise NotFound(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    step = _int_param(request, "step", None, 1000)
    ctx = await _state(request).services_ctx()
    if action == "approve":
        result: Any = await actions.approve(ctx, run_id, step)
    elif action == "run":
        result = await actions.run_step(ctx, run_id, step)
    elif action == "run_qa":
        result = await actions.run_qa(ctx, run_id, step)
    elif action == "rerun":
        result = await actions.retry(ctx, run_id, step)
    elif action == "pause":
        await actions.pause(ctx, run_id)
        result = "paused"
    elif action == "resume":
        await actions.resume(ctx, run_id)
        result = "running"
    else:
        await actions.cancel(ctx, run_id)
        result = "cancelled"
    return JSONResponse({"action": action, "result": result}, status_code=202)


def api_routes() -> list[BaseRoute]:
    return [
        Route("/api/projects", list_projects),
        Route("/api/protocols", list_protocols),
        Route("/api/protocols/{run_id:int}", get_protocol),
        Route("/api/protocols/{run_id:int}/actions/{action}", protocol_action, methods=["POST"]),
        Route("/api/events", list_events),
        Route("/api/deliveries", list_deliveries),
    ]
