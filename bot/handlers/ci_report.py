"""POST /webhooks/ci: any CI system reports a protocol branch's result, driving the CI transitions.

The hook goes through the same durable intake as the forges (bot/web/edge.py): verified and checked
in the request, stored and deduplicated, answered 202, then `process_delivery` runs the
handler below in a worker. Nothing but the checks happens in the request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import or_, select

from bot.core.errors import WebhookError
from bot.core.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.domain.graph import CHILD_SEPARATOR, parent_branch
from bot.domain.secrets_scan import process_scanner
from bot.forge.ci_fetch import hook_evidence
from bot.handlers.router import HandlerContext
from bot.handlers.sansio import IncomingDelivery
from bot.jobs.ci import apply_ci_result
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import emit, load_run, run_branch

TOKEN_ENV = "DEKSDENFLOW_WEBHOOK_TOKEN"
SIGNATURE_HEADER = "x-deksdenflow-signature"
TOKEN_HEADER = "x-deksdenflow-token"
MAX_FAILING = 100
MAX_LOG = 64 * 1024  # characters of the log tail a report may carry (its end is kept)

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
    stage: str = ""  # the failing stage (report.sh: the hook that failed)
    log: str = ""  # the tail of that stage's log


def verify(headers: dict[str, str], body: bytes, token: str) -> None:
    """Accept an HMAC-SHA256 of the body (`sha256=<hex>`) or the shared token; WebhookError(401)
    else."""
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
    if run_id is not None and (
        isinstance(run_id, bool) or not isinstance(run_id, int) or run_id < 1
    ):
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
    stage = data.get("stage", "")
    log_tail = data.get("log", "")
    if not isinstance(stage, str) or not isinstance(log_tail, str):
        raise WebhookError(422, "stage and log must be strings")
    return CIReport(
        status=status,
        branch=branch.strip() if isinstance(branch, str) else None,
        protocol_run_id=run_id,
        sha=sha,
        project=project or None,
        failing=tuple(f[:200] for f in failing),
        stage=stage.strip()[:200],
        log=log_tail[-MAX_LOG:],
    )


def reports_to(run: ProtocolRun, branch: str) -> bool:
    """Whether CI on `branch` is about `run`: the branch it commits to (its own, or the PR's it
    was planned on), or a child branch `NNNN-task--XX` a step of its graph runs on."""
    if branch == run_branch(run):
        return True
    return CHILD_SEPARATOR in branch and parent_branch(branch) == run.protocol_name


async def find_run(db: Any, report: CIReport) -> ProtocolRun | None:
    """The run the report is about; WebhookError(409) when a branch name is ambiguous."""
    async with db.sessions() as session:
        if report.protocol_run_id is not None:
            run: ProtocolRun | None = await session.get(ProtocolRun, report.protocol_run_id)
            if run is not None and report.branch is not None and not reports_to(run, report.branch):
                return None
            return run
        branch = report.branch or ""
        # candidates by name (own or parent branch) or by the PR branch kept in runtime_state;
        # reports_to then decides, so a JSON match the database reads loosely cannot mislead
        query = select(ProtocolRun).where(
            or_(
                ProtocolRun.protocol_name.in_({branch, parent_branch(branch)}),
                ProtocolRun.runtime_state["branch"].as_string() == branch,
            )
        )
        if report.project is not None:
            query = query.join(Project, Project.id == ProtocolRun.project_id).where(
                Project.name == report.project
            )
        found = (await session.execute(query.order_by(ProtocolRun.id.desc()).limit(20))).scalars()
        runs = [run for run in found if reports_to(run, branch)]
    if len({run.project_id for run in runs}) > 1:
        raise WebhookError(409, f"branch {branch!r} exists in several projects: pass project")
    # one PR's branch may carry a later protocol after an earlier one ended: the newest is live
    return runs[0] if runs else None


DELIVERY_HEADER = "x-deksdenflow-delivery"


def ci_delivery(headers: Mapping[str, str], body: bytes, secret: str) -> IncomingDelivery:
    """Verify and check a CI report (401/400/422 at once), as a delivery for the durable intake.

    Dedupe key: the caller's `X-DeksdenFlow-Delivery` when given, else a hash of the body (the
    same report sent twice is the same report).
    """
    low = {k.lower(): v for k, v in headers.items()}
    verify(low, body, secret)
    report = parse_report(body)
    key = low.get(DELIVERY_HEADER, "").strip()
    if not key:
        key = "sha256:" + hashlib.sha256(body).hexdigest()
    stored = body.decode("utf-8")
    if report.log:  # a CI log may echo a secret this process holds: never stored as sent
        data = json.loads(body)
        data["log"] = process_scanner().redact(report.log)
        stored = json.dumps(data)
    return IncomingDelivery(
        provider="ci",
        key=key[:255],
        event="report",
        action=report.status,
        body=stored,
        headers={k: low[k] for k in ("user-agent", DELIVERY_HEADER) if k in low},
    )


async def handle_report(ctx: HandlerContext) -> None:
    """The job side of the hook: find the run, then record `running` or apply the result."""

    services = ctx.services
    try:
        report = parse_report(ctx.delivery.body.encode())
        run = await find_run(services["db"], report)
    except WebhookError as exc:
        ctx.note(ignored=exc.message)
        return
    if run is None:
        what = (
            f"protocol run {report.protocol_run_id}"
            if report.protocol_run_id
            else f"branch {report.branch!r}"
        )
        ctx.note(ignored=f"no protocol for {what}")
        return
    if report.status == "running":
        loaded = await load_run(services["db"], run.id)
        await emit(
            services["db"],
            loaded,
            "ci.running",
            "CI running (reported by the CI hook)",
            sha=report.sha,
        )
        ctx.note(protocol_run_id=run.id, outcome="recorded")
        return

    failing = [(name, "failure") for name in report.failing]
    if report.status == "failure" and not failing:
        failing = [(report.stage or "ci", "failure")]
    evidence = hook_evidence([n for n, _ in failing], report.stage, report.log)
    outcome = await apply_ci_result(
        services, run.id, report.sha, report.status, failing, source="ci-hook", evidence=evidence
    )
    ctx.note(protocol_run_id=run.id, ci=report.status, outcome=outcome)
