"""POST /api/protocols/{id}/actions/{action}: the guarded actions on a protocol run."""

from __future__ import annotations

import logging
import secrets as secrets_mod
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.core.errors import (
    NotFound,
    TransitionConflict,
)
from bot.domain.states import ProtocolStatus
from bot.jobs import actions
from bot.jobs import catalogue as jobs
from bot.jobs.feedback import open_or_update_pr
from bot.jobs.plan import draft_pr_text
from bot.jobs.steps import spec_of
from bot.storage.runs import load_run, set_protocol_status, update_run
from bot.web.api.bodies import ActionBody
from bot.web.api.core import (
    BadGateway,
    _int_param,
    _path_id,
    _state,
    guarded,
    read_model,
)
from bot.web.api.resources import _load_run

# short names for the status enums: guards below list several at once
_P = ProtocolStatus

log = logging.getLogger(__name__)

# --- actions -------------------------------------------------------------------------------

ACTIONS = ("start", "approve", "run", "run_qa", "rerun", "pause", "resume", "cancel", "open_pr")


async def start_planning(ctx: dict[str, Any], run_id: int) -> str:
    """(Re)start planning: a pending run, or one whose planning failed before any step existed."""

    state = await load_run(ctx["db"], run_id)
    status = state.run.status
    if status == _P.FAILED and not state.steps:
        # the plan job carries on from `planning` (failed → planning is an allowed transition)
        await set_protocol_status(ctx["db"], run_id, _P.PLANNING, "planning restarted via the API")
    elif status != _P.PENDING:
        raise TransitionConflict("ProtocolRun", run_id, status, _P.PLANNING)
    suffix = secrets_mod.token_hex(4) if status == _P.FAILED else "0"

    await jobs.submit(ctx["redis"], jobs.plan_protocol(run_id, suffix))
    return _P.PLANNING


async def open_pr(ctx: dict[str, Any], run_id: int) -> dict[str, Any]:
    """Open (or update) the draft PR/MR of a planned run."""

    state = await load_run(ctx["db"], run_id)
    if state.run.status in (_P.PENDING, _P.PLANNING, _P.CANCELLED) or not state.run.template_config:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, "open_pr")
    spec = spec_of(state)
    title, body = draft_pr_text(state, spec)
    pull = await open_or_update_pr(ctx, run_id, title, body)
    if pull is None:
        raise BadGateway("the forge refused the draft PR; see the run's events")
    await update_run(ctx["db"], run_id, pr_number=pull.number, pr_url=pull.url)
    return {"pr_number": pull.number, "pr_url": pull.url}


@guarded
async def protocol_action(request: Request) -> Response:
    run_id = _path_id(request, "run_id", "protocol run")
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise NotFound(f"unknown action {action[:40]!r}; one of {', '.join(ACTIONS)}")
    body = await read_model(request, ActionBody, optional=True)
    step = body.step if body.step is not None else _int_param(request, "step", None, 10000)
    await _load_run(request, run_id)
    ctx = await _state(request).services_ctx()
    result: Any
    if action == "start":
        result = await start_planning(ctx, run_id)
    elif action == "approve":
        result = await actions.approve(ctx, run_id, step)
    elif action == "run":
        result = await actions.run_step(ctx, run_id, step)
    elif action == "run_qa":
        result = await actions.run_qa(ctx, run_id, step)
    elif action == "rerun":
        result = await actions.retry(ctx, run_id, step)
    elif action == "pause":
        await actions.pause(ctx, run_id)
        result = _P.PAUSED
    elif action == "resume":
        await actions.resume(ctx, run_id)
        result = _P.RUNNING
    elif action == "cancel":
        await actions.cancel(ctx, run_id)
        result = _P.CANCELLED
    else:
        result = await open_pr(ctx, run_id)
    run = await _load_run(request, run_id)
    return JSONResponse({"action": action, "result": result, "status": run.status}, status_code=202)
