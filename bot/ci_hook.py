"""POST /webhooks/ci: any CI system reports a protocol branch's result, driving the CI transitions."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.errors import WebhookError
from bot.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.models import Project, ProtocolRun

TOKEN_ENV = "DEKSDENFLOW_WEBHOOK_TOKEN"
SIGNATURE_HEADER = "x-deksdenflow-signature"
TOKEN_HEADER = "x-deksdenflow-token"
MAX_FAILING = 100

CIStatus = Literal["running", "success", "failure"]


@dataclass(frozen=True)
class CIReport:
    """A validated CI report body."""

    status: CIStatus
    branch: str | None
    protocol_run_id: int | None
    sha: str | None
    project: str | None
    failing: tuple[str, ...]


def verify(headers: dict[str, str], body: bytes, token: str) -> None:
    """Accept an HMAC-SHA256 of the body (`sha256=<hex>`) or the shared token; WebhookError(401) else."""
    lowered = {k.lower(): v for k, v in headers.items()}
    signature = lowered.get(SIGNATURE_HEADER)
    if signature is not None:
        expected = "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(signature.strip().encode(), expected.encode()):
            return
        raise WebhookError(401, "signature does not match the body")
    given = lowered.get(TOKEN_HEADER)
    if given is not None:
        if hmac.compare_digest(given.strip().encode(), token.encode()):
            return
        raise WebhookError(401, "wrong token")
    raise WebhookError(401, "missing X-DeksdenFlow-Signature or X-DeksdenFlow-Token")


def parse_report(body: bytes) -> CIReport:
    """The JSON body as a CIReport; WebhookError 400 (not JSON) or 422 (wrong fields)."""
    if too_deep(body):
        raise WebhookError(400, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookError(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WebhookError(422, "body must be a JSON object")
    status = data.get("status")
    if status not in ("running", "success", "failure"):
        raise WebhookError(422, "status must be one of running, success, failure")
    branch = data.get("branch")
    run_id = data.get("protocol_run_id")
    if branch is not None and (not isinstance(branch, str) or not branch.strip()):
        raise WebhookError(422, "branch must be a non-empty string")
    if run_id is not None and (isinstance(run_id, bool) or not isinstance(run_id, int) or run_id < 1):
        raise WebhookError(422, "protocol_run_id must be a positive integer")
    if branch is None and run_id is None:
        raise WebhookError(422, "give branch or protocol_run_id")
    sha = data.get("sha")
    if sha is not None and (not isinstance(sha, str) or not sha):
        raise WebhookError(422, "sha must be a non-empty string")
    project = data.get("project")
    if project is not None and not isinstance(project, str):
        raise WebhookError(422, "project must be a string")
    failing = data.get("failing", [])
    if not isinstance(failing, list) or not all(isinstance(f, str) for f in failing):
        raise WebhookError(422, "failing must be a list of check names")
    if len(failing) > MAX_FAILING:
        raise WebhookError(422, f"at most {MAX_FAILING} failing checks")
    return CIReport(
        status=status,
        branch=branch.strip() if isinstance(branch, str) else None,
        protocol_run_id=run_id,
        sha=sha,
        project=project or None,
        failing=tuple(f[:200] for f in failing),
    )


async def find_run(db: Any, report: CIReport) -> ProtocolRun | None:
    """The run the report is about; WebhookError(409) when a branch name is ambiguous."""
    async with db.sessions() as session:
        if report.protocol_run_id is not None:
            run: ProtocolRun | None = await session.get(ProtocolRun, report.protocol_run_id)
            if run is not None and report.branch is not None and run.protocol_name != report.branch:
                return None
            return run
        query = select(ProtocolRun).where(ProtocolRun.protocol_name == report.branch)
        if report.project is not None:
            query = query.join(Project, Project.id == ProtocolRun.project_id).where(
                Project.name == report.project
            )
        runs = list((await session.execute(query.limit(2))).scalars())
    if len(runs) > 1:
        raise WebhookError(409, f"branch {report.branch!r} exists in several projects: pass project")
    return runs[0] if runs else None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def ci_webhook(request: Request) -> Response:
    from bot.app import read_body_limited, state_of
    from bot.ci import apply_ci_result
    from bot.runs import emit, load_run

    state = state_of(request)
    secret = state.settings.webhook_token
    if secret is None or not secret.get_secret_value():
        # never open: an unset token is an operator error
        return _error(503, f"the CI hook is not configured: set {TOKEN_ENV}")
    try:
        body = await read_body_limited(request, state.settings.max_body_bytes)
        verify(dict(request.headers), body, secret.get_secret_value())
        report = parse_report(body)
        run = await find_run(state.db, report)
    except WebhookError as exc:
        return _error(exc.status_code, exc.message)
    if run is None:
        what = f"protocol run {report.protocol_run_id}" if report.protocol_run_id else f"branch {report.branch!r}"
        return _error(404, f"no protocol for {what}")
    ctx = await state.services_ctx()
    if report.status == "running":
        loaded = await load_run(ctx["db"], run.id)
        await emit(ctx["db"], loaded, "ci.running", "CI running (reported by the CI hook)", sha=report.sha)
        return JSONResponse({"protocol_run_id": run.id, "outcome": "recorded"}, status_code=202)
    failing = [(name, "failure") for name in report.failing]
    if report.status == "failure" and not failing:
        failing = [("ci", "failure")]
    outcome = await apply_ci_result(ctx, run.id, report.sha, report.status, failing)
    return JSONResponse({"protocol_run_id": run.id, "outcome": outcome})
