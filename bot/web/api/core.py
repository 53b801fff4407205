"""The API's common ground: who is calling, `guarded`, parameters, the JSON shapes of rows."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets as secrets_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.core.errors import (
    ConfigError,
    DeksdenFlowError,
    ForgeError,
    GitError,
    NotFound,
    SpecError,
    TransitionConflict,
)
from bot.core.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.domain.security import (
    forwarded,
    is_loopback,
)
from bot.domain.states import ProtocolStatus
from bot.storage import sessions
from bot.storage.models import Event, Project, ProtocolRun, StepRun, WebhookDelivery

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
        if (
            project_id is None
            or not stored
            or not hmac.compare_digest(stored, hash_token(project_token))
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
            # the app's handler answers these 503 with one line (bot/web/app.py database_errors)
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
    log.log(
        level,
        "API error %s (HTTP %d): %s: %s",
        error_id,
        status,
        type(exc).__name__,
        exc,
        exc_info=status >= 500,
    )
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
