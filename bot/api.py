"""Operator REST API under /api: projects, protocol runs, steps, events, deliveries, queues, actions."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets as secrets_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot import sessions
from bot.errors import (
    ConfigError,
    DeksdenFlowError,
    ForgeError,
    GitError,
    NotFound,
    SpecError,
    TransitionConflict,
)
from bot.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.models import Event, Project, ProtocolRun, StepRun, WebhookDelivery
from bot.protocol import ProtocolStatus, StepStatus
from bot.security import (
    forwarded,
    git_url_problem,
    is_loopback,
    ref_name_problem,
    same_repository_url,
)
from bot.store import new_event

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# starlette's TestClient peer; uvicorn only ever reports socket addresses
TEST_PEER = "testclient"
Endpoint = Callable[[Request], Awaitable[Response]]
# Postgres INTEGER ids: a larger number can never exist, and binding it would be a DataError.
MAX_ID = 2**31 - 1
CONSOLE_COOKIE = "deksdenflow_console"
# Cookie-authenticated writes must carry this header: a cross-site form cannot set it.
CONSOLE_HEADER = "x-deksdenflow-console"
TOKEN_HASH_KEY = "api_token_sha256"
PROTOCOL_STATUSES = tuple(s.value for s in ProtocolStatus)
STEP_STATUSES = tuple(s.value for s in StepStatus)
DELIVERY_STATUSES = ("pending", "queued", "processed", "ignored", "failed")


class Forbidden(DeksdenFlowError):
    """The caller is authenticated but this resource is outside its reach (HTTP 403)."""


class BadGateway(DeksdenFlowError):
    """A forge or git remote failed while serving the request (HTTP 502)."""


@dataclass(frozen=True)
class Access:
    """Who is calling: the operator (every project) or a project token (one project)."""

    project_id: int | None = None
    via_cookie: bool = False

    @property
    def admin(self) -> bool:
        return self.project_id is None


def _state(request: Request) -> Any:
    return request.app.state.df


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _project_id_of_token(token: str) -> int | None:
    # project tokens look like dfp_<project id>_<random>: the id finds the row to compare with
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "dfp" or not parts[1].isdigit():
        return None
    value = int(parts[1])
    return value if 0 < value <= MAX_ID else None


async def authenticate(request: Request) -> Access | JSONResponse:
    """Bearer token, console cookie, or X-Project-Token; with no API token set, loopback only."""
    settings = _state(request).settings
    token = settings.api_token.get_secret_value() if settings.api_token else None
    project_token = request.headers.get("x-project-token")
    if project_token:
        project_id = _project_id_of_token(project_token)
        stored: str | None = None
        if project_id is not None:
            async with _state(request).db.sessions() as session:
                project = await session.get(Project, project_id)
                if project is not None and project.enabled:
                    stored = (project.config or {}).get(TOKEN_HASH_KEY)
        if project_id is None or not stored or not hmac.compare_digest(
            stored, hash_token(project_token)
        ):
            return JSONResponse({"error": "wrong or revoked X-Project-Token"}, status_code=401)
        return Access(project_id=project_id)
    if token:
        given = request.headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
            return Access()
        cookie = request.cookies.get(CONSOLE_COOKIE, "")
        if cookie and await sessions.is_valid(_state(request).db, sessions.CONSOLE, cookie):
            return Access(via_cookie=True)
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
    if not loopback_caller(request):
        return JSONResponse(
            {"error": "set DEKSDENFLOW_API_TOKEN to use the API remotely"}, status_code=401
        )
    return Access()


def loopback_caller(request: Request) -> bool:
    """A caller on this machine, judged by the socket peer alone.

    Forwarding headers never make a caller local: through a proxy on this host every peer is
    127.0.0.1, so a request that carries them is treated as remote. And when `serve` listens
    beyond loopback without an API token, nobody is local enough.
    """
    if _state(request).extra.get("api_closed"):
        return False
    peer = request.client.host if request.client else ""
    return (is_loopback(peer) or peer == TEST_PEER) and not forwarded(request.headers)


def _database_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, psycopg.Error, sqlite3.Error)


DATABASE_ERRORS = _database_errors()


def guarded(endpoint: Endpoint) -> Endpoint:
    """Authenticate, then map the project's typed errors to HTTP answers (never a 500 for input)."""

    async def wrapper(request: Request) -> Response:
        access = await authenticate(request)
        if isinstance(access, JSONResponse):
            return access
        if (
            access.via_cookie
            and request.method not in ("GET", "HEAD")
            and request.headers.get(CONSOLE_HEADER) != "1"
        ):
            return JSONResponse(
                {"error": f"cookie-authenticated writes need the {CONSOLE_HEADER} header"},
                status_code=403,
            )
        request.state.access = access
        try:
            return await endpoint(request)
        except TransitionConflict as exc:
            return error_answer(
                409, str(exc), exc, current=exc.current, kind=exc.kind, wanted=exc.wanted
            )
        except NotFound as exc:
            return error_answer(404, one_line(str(exc)), exc)
        except Forbidden as exc:
            return error_answer(403, one_line(str(exc)), exc)
        except BodyInvalid as exc:
            return error_answer(422, "invalid request body", exc, detail=exc.detail)
        except (ForgeError, GitError, BadGateway) as exc:
            return error_answer(502, "the git remote or the forge failed", exc)
        except SpecError as exc:
            return error_answer(422, one_line(str(exc)), exc, detail=exc.errors)
        except (ValueError, ConfigError) as exc:
            return error_answer(400, one_line(str(exc)), exc)
        except DeksdenFlowError as exc:
            return error_answer(400, "the request could not be carried out", exc)
        except DATABASE_ERRORS:
            # the app's handler answers these 503 with one line (bot/app.py database_errors)
            raise
        except Exception as exc:  # the edge's catch-all: a reason and an id, never a traceback
            return error_answer(500, "internal error", exc)

    wrapper.__name__ = endpoint.__name__
    wrapper.__doc__ = endpoint.__doc__
    return wrapper


def one_line(text: str, limit: int = 300) -> str:
    return text.strip().splitlines()[0][:limit] if text.strip() else ""


def error_answer(status: int, reason: str, exc: BaseException, **extra: Any) -> JSONResponse:
    """A one-line reason and an error id; the details (command lines, paths) go to the log only.

    `reason` is written for the caller: for 4xx it is our own message about their input, for
    5xx a fixed sentence (the exception text stays in the log under the id).
    """
    error_id = secrets_mod.token_hex(6)
    # details kept from the caller are worth a warning; the caller's own mistakes are not
    hidden = reason != one_line(str(exc))
    level = logging.WARNING if status >= 500 or hidden else logging.INFO
    log.log(level, "API error %s (HTTP %d): %s: %s", error_id, status, type(exc).__name__, exc, exc_info=status >= 500)
    return JSONResponse({"error": reason, "error_id": error_id, **extra}, status_code=status)


def access_of(request: Request) -> Access:
    access: Access = request.state.access
    return access


def require_admin(request: Request) -> None:
    if not access_of(request).admin:
        raise Forbidden("a project token cannot use this endpoint; use DEKSDENFLOW_API_TOKEN")


def check_project(request: Request, project_id: int | None) -> None:
    """A project token reaches only its own project; others' rows look like they don't exist."""
    scope = access_of(request).project_id
    if scope is not None and project_id != scope:
        raise NotFound("no such resource for this project token")


# --- input parsing -------------------------------------------------------------------------


class BodyInvalid(DeksdenFlowError):
    """A JSON body failed validation (HTTP 422 with the field errors)."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.detail = detail


async def read_model(request: Request, model: type[M], *, optional: bool = False) -> M:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return model()
        raise ValueError("a JSON body is required")
    if len(raw) > 1_000_000:
        raise ValueError("request body larger than 1 MB")
    if too_deep(raw):
        raise ValueError(f"body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BodyInvalid(
            [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
        ) from None


def _int_param(
    request: Request, name: str, default: int | None = None, maximum: int = 500
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise ValueError(f"query parameter {name} must be a non-negative integer, got {raw[:40]!r}")
    return min(int(raw), maximum)


def _id_param(request: Request, name: str) -> int | None:
    """An id filter (Postgres INTEGER: larger numbers are refused, not bound)."""
    value = _int_param(request, name, None, MAX_ID + 1)
    if value is not None and value > MAX_ID:
        raise ValueError(f"query parameter {name} must be at most {MAX_ID}")
    return value


def _choice_param(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    if raw not in choices:
        raise ValueError(f"query parameter {name} must be one of {', '.join(choices)}")
    return raw


def _path_id(request: Request, name: str, kind: str) -> int:
    value = int(request.path_params[name])
    if value > MAX_ID:
        raise NotFound(f"{kind} {value} does not exist")
    return value


# --- JSON shapes ---------------------------------------------------------------------------


def project_json(p: Project) -> dict[str, Any]:
    config = {k: v for k, v in (p.config or {}).items() if k != TOKEN_HASH_KEY}
    return {
        "id": p.id,
        "name": p.name,
        "provider": p.provider,
        "git_url": p.git_url,
        "base_branch": p.base_branch,
        "ci_provider": p.ci_provider,
        "default_models": p.default_models,
        "config": config,
        # secrets are write-only: only their names come back
        "secret_names": sorted((p.secrets or {}).keys()),
        "has_project_token": bool((p.config or {}).get(TOKEN_HASH_KEY)),
        "enabled": p.enabled,
        "installation_id": p.installation_id,
        "forge_id": p.forge_id,
        "created_at": p.created_at.isoformat() if p.created_at else None,
    }


def run_json(r: ProtocolRun) -> dict[str, Any]:
    rs = r.runtime_state or {}
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
        "cost_usd": round(r.cost_usd or 0.0, 6),
        "ci_attempts": rs.get("ci_attempts", 0) if isinstance(rs, dict) else 0,
        "template_source": r.template_source,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }


def step_json(s: StepRun) -> dict[str, Any]:
    rs = s.runtime_state or {}
    return {
        "id": s.id,
        "protocol_run_id": s.protocol_run_id,
        "step_index": s.step_index,
        "step_name": s.step_name,
        "step_type": s.step_type,
        "status": s.status,
        "retries": s.retries,
        "engine_id": s.engine_id,
        "model": s.model,
        "summary": s.summary,
        "tokens_used": s.tokens_used,
        "cost_usd": round(s.cost_usd or 0.0, 6),
        "qa_verdict": rs.get("qa_verdict"),
        "commit_sha": rs.get("commit_sha"),
        "started_at": s.started_at.isoformat() if s.started_at else None,
        "finished_at": s.finished_at.isoformat() if s.finished_at else None,
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
        "metadata": e.metadata_,
        "created_at": e.created_at.isoformat(),
    }


def delivery_json(d: WebhookDelivery) -> dict[str, Any]:
    return {
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
        "enqueued_at": d.enqueued_at.isoformat() if d.enqueued_at else None,
        "processed_at": d.processed_at.isoformat() if d.processed_at else None,
    }


# --- request bodies --------------------------------------------------------------------------

Name = Field(min_length=1, max_length=255)


def _check_branch(value: str | None) -> str | None:
    problem = None if value is None else ref_name_problem(value)
    if problem:
        raise ValueError(f"base_branch {problem}")
    return value


class ProjectCreate(BaseModel):
    """A new project. `secrets` are stored and never returned."""

    model_config = ConfigDict(extra="forbid")
    name: str = Name
    provider: Literal["github", "gitlab", "local"] = "local"
    git_url: str = Field(min_length=1, max_length=4000)
    base_branch: str = Field(default="main", min_length=1, max_length=255)
    ci_provider: str | None = Field(default=None, max_length=32)
    default_models: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    installation_id: int | None = Field(default=None, ge=0)
    forge_id: str | None = Field(default=None, max_length=255)
    enabled: bool = True

    _branch = field_validator("base_branch")(_check_branch)


class ProjectUpdate(BaseModel):
    """Fields to change; `secrets` merge (a null value deletes that secret)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=255)
    git_url: str | None = Field(default=None, min_length=1, max_length=4000)
    base_branch: str | None = Field(default=None, min_length=1, max_length=255)
    ci_provider: str | None = Field(default=None, max_length=32)
    default_models: dict[str, str] | None = None
    secrets: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    enabled: bool | None = None

    _branch = field_validator("base_branch")(_check_branch)


class ProtocolCreate(BaseModel):
    """Create a protocol run for a task and start its planning."""

    model_config = ConfigDict(extra="forbid")
    project_id: int = Field(ge=1, le=MAX_ID)
    task: str = Field(min_length=1, max_length=2000)
    auto: bool = False
    issue_number: int | None = Field(default=None, ge=1, le=MAX_ID)
    issue_body: str = Field(default="", max_length=60000)


class ActionBody(BaseModel):
    """Optional action arguments: the step number for run/rerun/run_qa/approve."""

    model_config = ConfigDict(extra="forbid")
    step: int | None = Field(default=None, ge=0, le=10000)


# --- projects --------------------------------------------------------------------------------


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
    """422 unless `url` is acceptable for `provider` (bot/security.py: git_url_problem)."""
    settings = _state(request).settings
    problem = git_url_problem(url, provider, settings.forge_url(provider))
    if problem:
        raise BodyInvalid([{"loc": ["git_url"], "msg": f"git_url {problem}", "type": "value_error"}])


async def check_forge_answer(request: Request, project: Project, url: str) -> None:
    """422 unless the forge itself names `url` as the repository's clone URL.

    The host rule already keeps the token on the forge; this also keeps a project from pointing
    at another repository on that forge than the one its name and installation say.
    """
    if project.provider not in ("github", "gitlab"):
        return
    ctx = await _state(request).services_ctx()
    forges = ctx["forges"]
    answer: Any = None
    problem: str | None = None
    try:
        forge = forges.forge_for(project)
        if project.provider == "github":
            answer = (await forge.get_repo(forges.repo_ref(project))).get("clone_url")
        else:
            answer = (await forge.get_project(project.forge_id or project.name)).get("http_url_to_repo")
    except ConfigError:
        problem = f"cannot be checked: the {project.provider} forge is not configured"
    except ForgeError as exc:
        log.info("git_url check for %s: the forge answered %s", project.name, exc)
        problem = f"cannot be checked: {project.provider} does not show this repository to the bot"
    else:
        problem = None if isinstance(answer, str) and same_repository_url(answer, url) else (
            f"is not the clone URL {project.provider} gives for {project.name}"
        )
    if problem:
        raise BodyInvalid([{"loc": ["git_url"], "msg": f"git_url {problem}", "type": "value_error"}])


def seal_secrets(request: Request, kept: dict[str, Any], new: dict[str, str]) -> dict[str, Any]:
    """Stored secrets plus `new` ones, every value sealed with the secret key (older clear ones too)."""
    from bot.secretbox import fernet_of, seal_all

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
            session.add(new_event("project.created", f"project {body.name} registered via the API", project_id=project.id))
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
        raise TransitionConflict("Project", project_id, "exists", str(changes.get("name"))) from None
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
    from bot import actions

    body = await read_model(request, ProtocolCreate)
    project = await _load_project(request, body.project_id)
    if not project.enabled:
        raise TransitionConflict("Project", project.id, "disabled", "run")
    ctx = await _state(request).services_ctx()
    run = await actions.start_protocol(
        ctx, project, body.task, issue_number=body.issue_number, issue_body=body.issue_body, auto=body.auto
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
    """Events. `after=ID`: oldest first after that id (live tail); else newest first (`before=ID`)."""
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
            (await session.execute(query.order_by(WebhookDelivery.id.desc()).limit(limit))).scalars()
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


# --- queues --------------------------------------------------------------------------------

JOB_PREFIXES = {
    "delivery": "process_delivery",
    "plan": "plan_protocol",
    "exec": "execute_step",
    "qa": "run_quality",
    "setup": "project_setup",
}
FAILED_OUTCOMES = ("failed", "error", "timeout")


def job_name_of(job_id: str) -> str:
    prefix = job_id.split(":", 1)[0]
    return JOB_PREFIXES.get(prefix, prefix)


async def queue_snapshot(redis: Any, sample: int = 2000) -> dict[str, Any]:
    """Depth, in-progress and outcome counts per job name (queued/in-progress sampled up to `sample`)."""
    from arq.constants import default_queue_name

    from bot.jobs.common import JOB_METRICS_KEY
    from bot.queue import queue_stats

    stats = await queue_stats(redis)
    jobs: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return jobs.setdefault(name, {"queued": 0, "in_progress": 0, "failed": 0, "outcomes": {}})

    # the queue is a sorted set of job ids; our ids start with a per-function prefix
    for raw in await redis.zrange(default_queue_name, 0, sample - 1):
        entry(job_name_of(raw.decode() if isinstance(raw, bytes) else str(raw)))["queued"] += 1
    seen = 0
    async for raw in redis.scan_iter(match="arq:in-progress:*", count=500):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        entry(job_name_of(key.removeprefix("arq:in-progress:")))["in_progress"] += 1
        seen += 1
        if seen >= sample:
            break
    counts: dict[Any, Any] = await redis.hgetall(JOB_METRICS_KEY)
    failed_total = 0
    for raw_key, raw_value in counts.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        name, _, outcome = key.partition("|")
        item = entry(name)
        item["outcomes"][outcome] = int(raw_value)
        if outcome in FAILED_OUTCOMES:
            item["failed"] += int(raw_value)
            failed_total += int(raw_value)
    return {
        "queue": default_queue_name,
        "depth": stats.depth,
        "in_progress": stats.in_progress,
        "failed": failed_total,
        "jobs": dict(sorted(jobs.items())),
    }


@guarded
async def queues(request: Request) -> Response:
    """The arq queue: depth, jobs in progress, failures, per job name."""
    require_admin(request)
    redis = _state(request).redis
    try:
        snapshot = await queue_snapshot(redis)
    except (OSError, ConnectionError) as exc:
        return JSONResponse({"error": f"queue unreachable: {type(exc).__name__}"}, status_code=503)
    except Exception as exc:  # redis-py raises its own ConnectionError/TimeoutError family
        if type(exc).__module__.startswith("redis"):
            return JSONResponse({"error": f"queue unreachable: {type(exc).__name__}"}, status_code=503)
        raise
    return JSONResponse(snapshot)


# --- actions -------------------------------------------------------------------------------

ACTIONS = ("start", "approve", "run", "run_qa", "rerun", "pause", "resume", "cancel", "open_pr")


async def start_planning(ctx: dict[str, Any], run_id: int) -> str:
    """(Re)start planning: a pending run, or one whose planning failed before any step existed."""
    from bot.runs import load_run, set_protocol_status

    state = await load_run(ctx["db"], run_id)
    status = state.run.status
    if status == "failed" and not state.steps:
        # the plan job carries on from `planning` (failed → planning is an allowed transition)
        await set_protocol_status(ctx["db"], run_id, "planning", "planning restarted via the API")
    elif status != "pending":
        raise TransitionConflict("ProtocolRun", run_id, status, "planning")
    suffix = secrets_mod.token_hex(4) if status == "failed" else "0"
    from bot.jobs import catalogue as jobs

    await jobs.submit(ctx["redis"], jobs.plan_protocol(run_id, suffix))
    return "planning"


async def open_pr(ctx: dict[str, Any], run_id: int) -> dict[str, Any]:
    """Open (or update) the draft PR/MR of a planned run."""
    from bot.feedback import open_or_update_pr
    from bot.jobs.protocol import spec_of
    from bot.rendering import draft_pr_body, pr_title
    from bot.runs import load_run, update_run
    from bot.spec import SETUP_FILE

    state = await load_run(ctx["db"], run_id)
    if state.run.status in ("pending", "planning", "cancelled") or not state.run.template_config:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, "open_pr")
    spec = spec_of(state)
    name = state.run.protocol_name
    plan_files = [f".protocols/{name}/{f}" for f in ("plan.md", "context.md", "log.md", SETUP_FILE)]
    plan_files += [f".protocols/{name}/{s.file}" for s in spec.steps]
    body = draft_pr_body(
        protocol_name=name,
        task=state.run.description,
        issue_number=state.run.issue_number,
        plan_files=plan_files,
    )
    pull = await open_or_update_pr(ctx, run_id, pr_title(name, spec.task or state.run.description), body)
    if pull is None:
        raise BadGateway("the forge refused the draft PR; see the run's events")
    await update_run(ctx["db"], run_id, pr_number=pull.number, pr_url=pull.url)
    return {"pr_number": pull.number, "pr_url": pull.url}


@guarded
async def protocol_action(request: Request) -> Response:
    from bot import actions

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
        result = "paused"
    elif action == "resume":
        await actions.resume(ctx, run_id)
        result = "running"
    elif action == "cancel":
        await actions.cancel(ctx, run_id)
        result = "cancelled"
    else:
        result = await open_pr(ctx, run_id)
    run = await _load_run(request, run_id)
    return JSONResponse({"action": action, "result": result, "status": run.status}, status_code=202)


# --- OpenAPI ---------------------------------------------------------------------------------

_ID = {"type": "integer", "minimum": 1}
_PAGE = {"limit": "page size", "offset": "rows to skip"}
# (method, path, summary, query parameters, body model, success status)
OPERATIONS: list[tuple[str, str, str, dict[str, str], type[BaseModel] | None, int]] = [
    ("get", "/api/projects", "List projects", {}, None, 200),
    ("post", "/api/projects", "Create a project (secrets are write-only)", {}, ProjectCreate, 201),
    ("get", "/api/projects/{project_id}", "Read a project", {}, None, 200),
    ("patch", "/api/projects/{project_id}", "Update a project", {}, ProjectUpdate, 200),
    ("post", "/api/projects/{project_id}/disable", "Disable a project", {}, None, 200),
    ("post", "/api/projects/{project_id}/token", "Issue or rotate the project's X-Project-Token", {}, None, 201),
    ("get", "/api/protocols", "List protocol runs, newest first",
     {**_PAGE, "project_id": "only this project", "status": "only this status"}, None, 200),
    ("post", "/api/protocols", "Create a protocol run and start its planning", {}, ProtocolCreate, 201),
    ("get", "/api/protocols/{run_id}", "A protocol run with its steps", {}, None, 200),
    ("get", "/api/protocols/{run_id}/steps", "The steps of a protocol run", {}, None, 200),
    ("post", "/api/protocols/{run_id}/actions/{action}",
     "A guarded action: " + ", ".join(ACTIONS) + " (409 with the current status on conflict)",
     {"step": "step number for approve/run/run_qa/rerun"}, ActionBody, 202),
    ("get", "/api/steps/{step_id}", "One step run", {}, None, 200),
    ("get", "/api/events", "Events; `after` tails oldest-first, else newest-first with `before`",
     {"limit": "page size", "after": "only ids above (live tail)", "before": "only ids below",
      "project_id": "filter", "protocol_run_id": "filter", "step_run_id": "filter",
      "type": "event type"}, None, 200),
    ("get", "/api/deliveries", "Webhook deliveries with their outcome, newest first",
     {"limit": "page size", "before": "only ids below", "provider": "github|gitlab",
      "status": "|".join(DELIVERY_STATUSES), "event": "event name"}, None, 200),
    ("get", "/api/deliveries/{delivery_id}", "One delivery", {}, None, 200),
    ("get", "/api/queues", "Queue depth, in progress and failures per job name", {}, None, 200),
]
_STRING_PARAMS = {"status", "type", "provider", "event"}


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of /api, built from OPERATIONS and the pydantic bodies."""
    error = {"$ref": "#/components/schemas/Error"}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "error_id": {"type": "string"}, "current": {"type": "string"},
                           "detail": {"type": "array", "items": {"type": "object"}}},
            "required": ["error"],
        }
    }
    paths: dict[str, Any] = {}
    for method, path, summary, query, model, success in OPERATIONS:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True,
             "schema": {"type": "string", "enum": list(ACTIONS)} if name == "action" else _ID}
            for name in (part[1:-1] for part in path.split("/") if part.startswith("{"))
        ]
        params += [
            {"name": name, "in": "query", "required": False, "description": text,
             "schema": {"type": "string"} if name in _STRING_PARAMS else {"type": "integer", "minimum": 0}}
            for name, text in query.items()
        ]
        responses: dict[str, Any] = {
            str(success): {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": {"description": "bad input", "content": {"application/json": {"schema": error}}},
            "401": {"description": "missing or wrong token"},
            "403": {"description": "not allowed for this caller"},
            "404": {"description": "unknown id", "content": {"application/json": {"schema": error}}},
        }
        if method != "get":
            responses["409"] = {"description": "conflict: the current status does not allow it",
                                "content": {"application/json": {"schema": error}}}
            responses["422"] = {"description": "invalid body", "content": {"application/json": {"schema": error}}}
        op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path}", "parameters": params,
                              "responses": responses}
        if model is not None:
            schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            op["requestBody"] = {
                "required": model is not ActionBody,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        paths.setdefault(path, {})[method] = op
    # routes other modules add to /api without an OPERATIONS entry are still described
    for route in api_routes():
        path = getattr(route, "path", "").replace(":int", "")
        for method in sorted(m.lower() for m in getattr(route, "methods", None) or ()):
            if method == "head" or path == "/api/openapi.json" or method in paths.get(path, {}):
                continue
            doc = (getattr(route, "endpoint", None).__doc__ or path).strip().splitlines()[0]
            paths.setdefault(path, {})[method] = {
                "summary": doc,
                "operationId": f"{method}_{path}",
                "parameters": [
                    {"name": part[1:-1], "in": "path", "required": True, "schema": _ID}
                    for part in path.split("/")
                    if part.startswith("{")
                ],
                "responses": {"200": {"description": "OK"}, "400": {"description": "bad input"}},
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "DeksdenFlow operator API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "DEKSDENFLOW_API_TOKEN"},
                "projectToken": {"type": "apiKey", "in": "header", "name": "X-Project-Token"},
            },
        },
        "security": [{"bearer": []}, {"projectToken": []}],
    }


async def openapi(request: Request) -> Response:
    """The description itself is public: it holds no data."""
    return JSONResponse(build_openapi())


def api_routes() -> list[BaseRoute]:
    from bot.codemachine import api_import_endpoint as codemachine_import
    from bot.console_deliveries import redeliver
    from bot.console_steps import transcript_api

    return [
        Route("/api/openapi.json", openapi),
        Route("/api/projects", list_projects, methods=["GET"]),
        Route("/api/projects", create_project, methods=["POST"]),
        Route("/api/projects/{project_id:int}", get_project, methods=["GET"]),
        Route("/api/projects/{project_id:int}", update_project, methods=["PATCH"]),
        Route("/api/projects/{project_id:int}/disable", disable_project, methods=["POST"]),
        Route("/api/projects/{project_id:int}/token", rotate_project_token, methods=["POST"]),
        Route("/api/protocols", list_protocols, methods=["GET"]),
        Route("/api/protocols", create_protocol, methods=["POST"]),
        Route("/api/protocols/{run_id:int}", get_protocol, methods=["GET"]),
        Route("/api/protocols/{run_id:int}/steps", list_steps, methods=["GET"]),
        Route("/api/protocols/{run_id:int}/actions/{action}", protocol_action, methods=["POST"]),
        Route("/api/steps/{step_id:int}", get_step, methods=["GET"]),
        Route("/api/events", list_events, methods=["GET"]),
        Route("/api/deliveries", list_deliveries, methods=["GET"]),
        Route("/api/deliveries/{delivery_id:int}", get_delivery, methods=["GET"]),
        Route("/api/queues", queues, methods=["GET"]),
        Route("/api/projects/{project_id:int}/codemachine/import", codemachine_import(), methods=["POST"]),
        Route("/api/steps/{step_id:int}/transcript", transcript_api, methods=["GET"]),
        Route("/api/deliveries/{delivery_id:int}/redeliver", redeliver, methods=["POST"]),
    ]
