"""Endpoints over rows: projects, protocol runs, steps, events, deliveries."""

from __future__ import annotations

import logging
import secrets as secrets_mod
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.core.errors import (
    ConfigError,
    ForgeError,
    NotFound,
    TransitionConflict,
)
from bot.domain.security import (
    git_url_problem,
    same_repository_url,
)
from bot.forge.kinds import forge_kind
from bot.jobs import actions
from bot.storage.models import Event, Project, ProtocolRun, StepRun, WebhookDelivery
from bot.storage.runs import new_event
from bot.storage.secretbox import fernet_of, seal_all
from bot.web.api.bodies import ProjectCreate, ProjectUpdate, ProtocolCreate
from bot.web.api.core import (
    DELIVERY_STATUSES,
    PROTOCOL_STATUSES,
    TOKEN_HASH_KEY,
    BodyInvalid,
    _choice_param,
    _id_param,
    _int_param,
    _path_id,
    _state,
    access_of,
    check_project,
    delivery_json,
    event_json,
    guarded,
    hash_token,
    project_json,
    read_model,
    require_admin,
    run_json,
    step_json,
)

log = logging.getLogger(__name__)


async def _load_project(request: Request, project_id: int) -> Project:
    check_project(request, project_id)
    project: Project | None
    async with _state(request).db.sessions() as session:
        project = await session.get(Project, project_id)
    if project is None:
        raise NotFound(f"project {project_id} does not exist")
    return project


@guarded
async def list_projects(request: Request) -> Response:
    """Projects, oldest first (at most 500)."""
    query = select(Project).order_by(Project.id).limit(500)
    scope = access_of(request).project_id
    if scope is not None:
        query = query.where(Project.id == scope)
    async with _state(request).db.sessions() as session:
        rows = (await session.execute(query)).scalars()
        return JSONResponse({"items": [project_json(p) for p in rows]})


# What only the operator token may change: where the bot sends the forge's token (git_url),
# the secrets, and who may run commands (the permission table, and the base branch whose
# .deksdenflow.yml decides it). A project token reads its project and drives its runs.
OPERATOR_FIELDS = frozenset({"name", "enabled", "git_url", "secrets", "base_branch"})
OPERATOR_CONFIG_KEYS = ("permissions", "allow_fork_commands", "labels", "policies", "repo", "setup")


def check_git_url(request: Request, url: str, provider: str) -> None:
    """422 unless `url` is acceptable for `provider` (bot/domain/security.py: git_url_problem)."""
    settings = _state(request).settings
    kind = forge_kind(provider)
    if kind is None:  # the body's model admits only the known forges
        raise BodyInvalid([{"loc": ["provider"], "msg": "unknown provider", "type": "value_error"}])
    problem = git_url_problem(url, kind.repo_url, settings.forge_url(provider))
    if problem:
        raise BodyInvalid(
            [{"loc": ["git_url"], "msg": f"git_url {problem}", "type": "value_error"}]
        )


async def check_forge_answer(request: Request, project: Project, url: str) -> None:
    """422 unless the forge itself names `url` as the repository's clone URL.

    The host rule already keeps the token on the forge; this also keeps a project from pointing
    at another repository on that forge than the one its name and installation say.
    """
    kind = forge_kind(project.provider)
    if kind is None or kind.checkout_is_origin:  # a checkout's own path: no forge to ask
        return
    ctx = await _state(request).services_ctx()
    forges = ctx["forges"]
    answer: Any = None
    problem: str | None = None
    try:
        answer = await forges.forge_for(project).clone_url(forges.repo_ref(project))
    except ConfigError:
        problem = f"cannot be checked: the {project.provider} forge is not configured"
    except ForgeError as exc:
        log.info("git_url check for %s: the forge answered %s", project.name, exc)
        problem = f"cannot be checked: {project.provider} does not show this repository to the bot"
    else:
        problem = (
            None
            if isinstance(answer, str) and same_repository_url(answer, url)
            else (f"is not the clone URL {project.provider} gives for {project.name}")
        )
    if problem:
        raise BodyInvalid(
            [{"loc": ["git_url"], "msg": f"git_url {problem}", "type": "value_error"}]
        )


def seal_secrets(request: Request, kept: dict[str, Any], new: dict[str, str]) -> dict[str, Any]:
    """Stored secrets plus `new` ones, each sealed with the secret key (old clear ones too)."""

    return seal_all(fernet_of(_state(request).settings), {**kept, **new})


@guarded
async def create_project(request: Request) -> Response:
    require_admin(request)
    body = await read_model(request, ProjectCreate)
    check_git_url(request, body.git_url, body.provider)
    values = body.model_dump()
    await check_forge_answer(request, Project(**values), body.git_url)
    values["secrets"] = seal_secrets(request, {}, values["secrets"])
    # the token hash is only ever set by POST /api/projects/{id}/token
    values["config"] = {k: v for k, v in values["config"].items() if k != TOKEN_HASH_KEY}
    try:
        async with _state(request).db.sessions.begin() as session:
            project = Project(**values)
            session.add(project)
            await session.flush()
            session.add(
                new_event(
                    "project.created",
                    f"project {body.name} registered via the API",
                    project_id=project.id,
                )
            )
    except IntegrityError:
        raise TransitionConflict("Project", 0, "exists", body.name) from None
    return JSONResponse(project_json(project), status_code=201)


@guarded
async def get_project(request: Request) -> Response:
    project = await _load_project(request, _path_id(request, "project_id", "project"))
    return JSONResponse(project_json(project))


@guarded
async def update_project(request: Request) -> Response:
    project_id = _path_id(request, "project_id", "project")
    current = await _load_project(request, project_id)
    body = await read_model(request, ProjectUpdate)
    changes = body.model_dump(exclude_unset=True)
    if not OPERATOR_FIELDS.isdisjoint(changes):
        require_admin(request)
    if changes.get("git_url") is not None:
        check_git_url(request, changes["git_url"], current.provider)
        await check_forge_answer(request, current, changes["git_url"])
    try:
        async with _state(request).db.sessions.begin() as session:
            project = await session.get(Project, project_id, with_for_update=True)
            if project is None:
                raise NotFound(f"project {project_id} does not exist")
            for key, value in changes.items():
                if key == "secrets":
                    merged = dict(project.secrets or {})
                    for name, secret in (value or {}).items():
                        if secret is None:
                            merged.pop(name, None)
                    project.secrets = seal_secrets(
                        request, merged, {k: v for k, v in (value or {}).items() if v is not None}
                    )
                elif key == "config":
                    old_config = project.config or {}
                    keep = old_config.get(TOKEN_HASH_KEY)
                    given = {k: v for k, v in (value or {}).items() if k != TOKEN_HASH_KEY}
                    if any(given.get(k) != old_config.get(k) for k in OPERATOR_CONFIG_KEYS):
                        # who may run commands is the operator's (and the base branch's) call
                        require_admin(request)
                    project.config = {**given, **({TOKEN_HASH_KEY: keep} if keep else {})}
                elif value is None and key in ("name", "git_url", "base_branch", "enabled"):
                    raise ValueError(f"{key} cannot be null")
                else:
                    setattr(project, key, value)
    except IntegrityError:
        raise TransitionConflict(
            "Project", project_id, "exists", str(changes.get("name"))
        ) from None
    return JSONResponse(project_json(await _load_project(request, project_id)))


@guarded
async def disable_project(request: Request) -> Response:
    """Disable a project: no new runs; its project token stops working."""
    require_admin(request)
    project_id = _path_id(request, "project_id", "project")
    await _load_project(request, project_id)
    async with _state(request).db.sessions.begin() as session:
        project = await session.get(Project, project_id)
        assert project is not None
        project.enabled = False
    return JSONResponse(project_json(await _load_project(request, project_id)))


@guarded
async def rotate_project_token(request: Request) -> Response:
    """Issue (or replace) the project's X-Project-Token; shown once, stored hashed."""
    require_admin(request)
    project_id = _path_id(request, "project_id", "project")
    await _load_project(request, project_id)
    token = f"dfp_{project_id}_{secrets_mod.token_urlsafe(24)}"
    async with _state(request).db.sessions.begin() as session:
        project = await session.get(Project, project_id)
        assert project is not None
        project.config = {**(project.config or {}), TOKEN_HASH_KEY: hash_token(token)}
    return JSONResponse({"project_id": project_id, "token": token}, status_code=201)


# --- protocol runs and steps -----------------------------------------------------------------


@guarded
async def list_protocols(request: Request) -> Response:
    """Protocol runs, newest first; filters project_id and status; offset pagination."""
    limit = _int_param(request, "limit", 50, 200) or 50
    offset = _int_param(request, "offset", 0, 10**7) or 0
    query = select(ProtocolRun)
    count = select(func.count()).select_from(ProtocolRun)
    project_id = _id_param(request, "project_id")
    scope = access_of(request).project_id
    if scope is not None:
        if project_id is not None and project_id != scope:
            raise NotFound("no such project for this project token")
        project_id = scope
    status = _choice_param(request, "status", PROTOCOL_STATUSES)
    if project_id is not None:
        query = query.where(ProtocolRun.project_id == project_id)
        count = count.where(ProtocolRun.project_id == project_id)
    if status:
        query = query.where(ProtocolRun.status == status)
        count = count.where(ProtocolRun.status == status)
    async with _state(request).db.sessions() as session:
        total = (await session.execute(count)).scalar()
        rows = (
            await session.execute(query.order_by(ProtocolRun.id.desc()).limit(limit).offset(offset))
        ).scalars()
        return JSONResponse(
            {"items": [run_json(r) for r in rows], "total": total, "limit": limit, "offset": offset}
        )


async def _load_run(request: Request, run_id: int) -> ProtocolRun:
    run: ProtocolRun | None
    async with _state(request).db.sessions() as session:
        run = await session.get(ProtocolRun, run_id)
    if run is None:
        raise NotFound(f"protocol run {run_id} does not exist")
    check_project(request, run.project_id)
    return run


async def _steps_of(request: Request, run_id: int) -> list[StepRun]:
    async with _state(request).db.sessions() as session:
        return list(
            (
                await session.execute(
                    select(StepRun)
                    .where(StepRun.protocol_run_id == run_id)
                    .order_by(StepRun.step_index)
                    .limit(1000)
                )
            ).scalars()
        )


@guarded
async def create_protocol(request: Request) -> Response:
    """Create a protocol run for a task and enqueue its planning."""

    body = await read_model(request, ProtocolCreate)
    project = await _load_project(request, body.project_id)
    if not project.enabled:
        raise TransitionConflict("Project", project.id, "disabled", "run")
    ctx = await _state(request).services_ctx()
    run = await actions.start_protocol(
        ctx,
        project,
        body.task,
        issue_number=body.issue_number,
        issue_body=body.issue_body,
        auto=body.auto,
    )
    return JSONResponse(run_json(await _load_run(request, run.id)), status_code=201)


@guarded
async def get_protocol(request: Request) -> Response:
    run_id = _path_id(request, "run_id", "protocol run")
    run = await _load_run(request, run_id)
    steps = await _steps_of(request, run_id)
    return JSONResponse({**run_json(run), "steps": [step_json(s) for s in steps]})


@guarded
async def list_steps(request: Request) -> Response:
    run_id = _path_id(request, "run_id", "protocol run")
    await _load_run(request, run_id)
    return JSONResponse({"items": [step_json(s) for s in await _steps_of(request, run_id)]})


@guarded
async def get_step(request: Request) -> Response:
    step_id = _path_id(request, "step_id", "step")
    async with _state(request).db.sessions() as session:
        step = await session.get(StepRun, step_id)
    if step is None:
        raise NotFound(f"step {step_id} does not exist")
    run = await _load_run(request, step.protocol_run_id)
    return JSONResponse({**step_json(step), "project_id": run.project_id, "policy": step.policy})


# --- events and deliveries -------------------------------------------------------------------


@guarded
async def list_events(request: Request) -> Response:
    """Events. `after=ID`: oldest first after that id (live tail); else newest first (`before`)."""
    limit = _int_param(request, "limit", 100, 500) or 100
    after = _int_param(request, "after", None, 10**15)
    before = _int_param(request, "before", None, 10**15)
    if after is not None and before is not None:
        raise ValueError("use either after or before, not both")
    query = select(Event)
    filters: dict[str, int | None] = {}
    for name, column in (
        ("project_id", Event.project_id),
        ("protocol_run_id", Event.protocol_run_id),
        ("step_run_id", Event.step_run_id),
    ):
        value = _id_param(request, name)
        filters[name] = value
        if value is not None:
            query = query.where(column == value)
    scope = access_of(request).project_id
    if scope is not None:
        # rows of other projects (and project-less ones) are out of reach
        query = query.where(Event.project_id == scope)
    event_type = request.query_params.get("type")
    if event_type:
        if len(event_type) > 64:
            raise ValueError("query parameter type is at most 64 characters")
        query = query.where(Event.event_type == event_type)
    if after is not None:
        query = query.where(Event.id > after).order_by(Event.id)
    else:
        if before is not None:
            query = query.where(Event.id < before)
        query = query.order_by(Event.id.desc())
    async with _state(request).db.sessions() as session:
        rows = list((await session.execute(query.limit(limit))).scalars())
    items = [event_json(e) for e in rows]
    return JSONResponse(
        {
            "items": items,
            # poll with ?after=next_after for new events; page back with ?before=next_before
            "next_after": max((e.id for e in rows), default=after),
            "next_before": min((e.id for e in rows), default=None) if len(rows) == limit else None,
        }
    )


@guarded
async def list_deliveries(request: Request) -> Response:
    """Webhook deliveries, newest first, with their outcome; filters provider, status, event."""
    require_admin(request)  # deliveries belong to the installation, not to one project
    limit = _int_param(request, "limit", 50, 200) or 50
    before = _int_param(request, "before", None, 10**15)
    # the raw payload can be 25 MB per row: lists never load it
    query = select(WebhookDelivery).options(defer(WebhookDelivery.payload))
    provider = _choice_param(request, "provider", ("github", "gitlab"))
    status = _choice_param(request, "status", DELIVERY_STATUSES)
    if provider:
        query = query.where(WebhookDelivery.provider == provider)
    if status:
        query = query.where(WebhookDelivery.status == status)
    if request.query_params.get("event"):
        query = query.where(WebhookDelivery.event == request.query_params["event"][:64])
    if before is not None:
        query = query.where(WebhookDelivery.id < before)
    async with _state(request).db.sessions() as session:
        rows = list(
            (
                await session.execute(query.order_by(WebhookDelivery.id.desc()).limit(limit))
            ).scalars()
        )
    return JSONResponse(
        {
            "items": [delivery_json(d) for d in rows],
            "next_before": rows[-1].id if len(rows) == limit else None,
        }
    )


@guarded
async def get_delivery(request: Request) -> Response:
    require_admin(request)
    delivery_id = _path_id(request, "delivery_id", "delivery")
    async with _state(request).db.sessions() as session:
        found = (
            await session.execute(
                select(WebhookDelivery, func.length(WebhookDelivery.payload))
                .options(defer(WebhookDelivery.payload))
                .where(WebhookDelivery.id == delivery_id)
            )
        ).first()
    if found is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return JSONResponse({**delivery_json(found[0]), "payload_bytes": int(found[1] or 0)})
