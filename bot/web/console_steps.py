"""Console step pages and live streams (SSE); registers the delivery pages and `/` too."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from bot.domain import graph
from bot.domain.diffview import FileDiff, parse_diff
from bot.domain.pricing import fmt_cost
from bot.domain.rendering import fmt_duration
from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.kinds import forge_kind
from bot.git.names import safe_repo_name
from bot.git.runner import run_git
from bot.storage.models import Event, Project, ProtocolRun, StepRun
from bot.storage.transcript import transcript_page
from bot.web.api.core import (
    MAX_ID,
    Access,
    authenticate,
    event_json,
    project_json,
    run_json,
    step_json,
)
from bot.web.api.run_actions import ACTIONS
from bot.web.console import console_page, render

PAGE_ITEMS = 200  # transcript items on the first screen; older ones page in with ?before=
STREAM_POLL_S = 0.4  # how often a stream looks for new rows (any worker may be writing them)
STREAM_MAX_S = 600.0  # then the stream ends and EventSource reconnects with Last-Event-ID
KEEPALIVE_S = 15.0
# short names for the status enums: the button rules below list several at once
_P = ProtocolStatus
_S = StepStatus
FINISHED_STEP = (_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.BLOCKED)
PHASE_NAMES = {"execute": "Execution", "qa": "Quality check", "planning": "Planning",
               "decompose": "Decomposition", "discovery": "Discovery"}  # fmt: skip
# run statuses in which no step may be (re)run: bot/jobs/actions.py refuses them with a 409
NOT_RUNNABLE = (_P.COMPLETED, _P.CANCELLED, _P.PAUSED, _P.PENDING, _P.PLANNING)


# -- which actions are valid now (pure) -------------------------------------------------------


def valid_actions(run: dict[str, Any], steps: Sequence[dict[str, Any]]) -> list[str]:
    """The run-level buttons worth offering in this state (the API still guards each one)."""
    status = run["status"]
    statuses = {s["status"] for s in steps}
    actions: list[str] = []
    if status == _P.PENDING or (status == _P.FAILED and not steps):
        actions.append("start")
    if status in (_P.PLANNED, _P.RUNNING, _P.PAUSED, _P.BLOCKED) and not run.get("approved"):
        actions.append("approve")
    runnable = status not in NOT_RUNNABLE and bool(steps) and _S.RUNNING not in statuses
    if runnable and statuses & {_S.PENDING, _S.FAILED, _S.BLOCKED}:
        actions.append("run")
    if _S.NEEDS_QA in statuses and status not in (_P.CANCELLED, _P.COMPLETED):
        actions.append("run_qa")
    if runnable and statuses & {_S.FAILED, _S.BLOCKED}:
        actions.append("rerun")
    if status == _P.RUNNING:
        actions.append("pause")
    if status in (_P.PAUSED, _P.BLOCKED):
        actions.append("resume")
    if status not in (_P.COMPLETED, _P.CANCELLED):
        actions.append("cancel")
    if status not in (_P.PENDING, _P.PLANNING, _P.CANCELLED) and steps and not run.get("pr_url"):
        actions.append("open_pr")
    return actions


def step_actions(run_status: str, step_status: str) -> list[str]:
    """Per-step buttons: Rerun (failed/blocked/completed, run not finished) and QA."""
    actions: list[str] = []
    if run_status not in NOT_RUNNABLE and step_status in (_S.FAILED, _S.BLOCKED, _S.COMPLETED):
        actions.append("rerun")
    finished_run = run_status in (_P.CANCELLED, _P.COMPLETED)
    if step_status in (_S.NEEDS_QA, _S.COMPLETED) and not finished_run:
        actions.append("run_qa")
    return actions


def step_facts(step: StepRun) -> dict[str, Any]:
    """The step page's live numbers (also streamed as the `step` event)."""
    rs = step.runtime_state or {}
    duration = None
    if step.started_at and step.finished_at:
        duration = (step.finished_at - step.started_at).total_seconds()
    return {
        **step_json(step),
        "duration": fmt_duration(duration) if duration is not None else "—",
        "phase_running": step.status == _S.RUNNING,
        "cost": fmt_cost(step.cost_usd or 0.0),
        "attempts": (step.retries or 0) + 1,
        "qa_attempts": rs.get("qa_attempts", 0),
        "qa_report": rs.get("qa_report"),
        "error": rs.get("error")
        or (step.summary if step.status in (_S.FAILED, _S.BLOCKED) else None),
    }


def run_state(run: ProtocolRun, steps: Sequence[StepRun]) -> dict[str, Any]:
    """The protocol page's live state: the run, its steps, and which buttons are valid."""
    data = run_json(run)
    step_rows = [
        {**step_json(s), "cost": fmt_cost(s.cost_usd or 0.0), "duration": step_facts(s)["duration"],
         "actions": step_actions(run.status, s.status)}
        for s in steps
    ]  # fmt: skip
    return {
        "run": {**data, "cost": fmt_cost(run.cost_usd or 0.0)},
        "steps": step_rows,
        "buttons": valid_actions(data, step_rows),
        "graph": graph_nodes(run, steps),
    }


def graph_nodes(run: ProtocolRun, steps: Sequence[StepRun]) -> list[dict[str, Any]]:
    """The plan's graph for the protocol page, one node per step with its column, its
    dependencies and its state; [] for a plan that is a plain chain (the table says it all)."""

    if not graph.runs_in_parallel(run.template_config):
        return []
    deps = graph.dependencies_of_config(run.template_config)
    column = graph.depths(deps)
    return [
        {"index": s.step_index, "title": s.summary or s.step_name, "status": s.status,
         "merged": (s.runtime_state or {}).get("integrated_attempt") == s.retries,
         "column": column.get(s.step_index, 0), "depends_on": list(deps.get(s.step_index, ()))}
        for s in steps
    ]  # fmt: skip


def collapse_started(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop a command's "running" line once the same command's result follows (pure)."""
    shown: list[dict[str, Any]] = []
    for item in items:
        if item["kind"] == "command" and item["data"].get("status") != "running":
            for n in range(len(shown) - 1, max(-1, len(shown) - 20), -1):
                prior = shown[n]
                if prior["kind"] == "command" and prior["data"].get("status") == "running" \
                        and prior["text"] == item["text"]:  # fmt: skip
                    del shown[n]
                    break
        shown.append(item)
    return shown


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Events message."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


# -- loading ----------------------------------------------------------------------------------


def _db(request: Request) -> Any:
    return request.app.state.df.db


def _int(request: Request, name: str) -> int:
    value = int(request.path_params[name])
    if value > MAX_ID:
        raise LookupError(f"{name} {value} does not exist")
    return value


def _cursor(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name) or ""
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{name} must be a non-negative integer")
    return min(int(raw), 2**62)


async def _load_step(request: Request) -> tuple[ProtocolRun, StepRun, Project | None]:
    run_id, index = _int(request, "run_id"), _int(request, "step_index")
    async with _db(request).sessions() as session:
        run = await session.get(ProtocolRun, run_id)
        if run is None:
            raise LookupError(f"protocol run {run_id} does not exist")
        step = (
            await session.execute(
                select(StepRun).where(
                    StepRun.protocol_run_id == run_id, StepRun.step_index == index
                )
            )
        ).scalar()
        if step is None:
            raise LookupError(f"protocol run {run_id} has no step {index}")
        project = await session.get(Project, run.project_id)
    return run, step, project


def _workdir(run: ProtocolRun) -> Path | None:
    return Path(run.worktree_path) if run.worktree_path else None


def diff_sources(request: Request, run: ProtocolRun, project: Project | None) -> list[Path]:
    """Where the step's commit can be read: the run's worktree, the mirror, a local origin."""
    settings = request.app.state.df.settings
    places: list[Path] = []
    if run.worktree_path:
        places.append(Path(run.worktree_path))
    if project is not None:
        places.append(
            settings.data_dir / "git" / "mirrors" / f"{safe_repo_name(project.git_url)}.git"
        )
        kind = forge_kind(project.provider)
        if kind is not None and kind.checkout_is_origin:  # a plain checkout: its own path
            places.append(Path(project.git_url))
    return [p for p in places if p.exists()]


async def load_diff(sources: Sequence[Path], sha: str) -> list[FileDiff] | None:
    """The commit's diff from the first place that has it, or None when none does."""
    if not sha or not all(c in "0123456789abcdef" for c in sha.lower()):
        return None
    for place in sources:
        done = await run_git(
            ["show", "--no-color", "--format=", "--patch", "-M", sha, "--"],
            cwd=place, timeout=15, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return parse_diff(done.stdout.decode("utf-8", "replace"))
    return None


# -- pages ------------------------------------------------------------------------------------


@functools.cache
def pygments_css() -> str:
    """The colours of highlighted diff lines (pygments' default light style, scoped to diffs)."""
    from pygments.formatters import HtmlFormatter

    css: str = HtmlFormatter(style="default").get_style_defs("table.diff td.code")  # type: ignore[no-untyped-call]
    # token colours only: the style's backgrounds would paint over the added/removed lines
    return "\n".join(
        line for line in css.splitlines()
        if line.startswith("table.diff td.code .") and ".hll" not in line
    )  # fmt: skip


@console_page
async def step_page(request: Request) -> Response:
    run, step, project = await _load_step(request)
    before = _cursor(request, "before")
    items = await transcript_page(
        _db(request),
        step_run_id=step.id,
        before=before or 2**62,
        limit=PAGE_ITEMS,
        workdir=_workdir(run),
    )
    sha = (step.runtime_state or {}).get("commit_sha")
    diff = await load_diff(diff_sources(request, run, project), sha) if sha else None
    return render(
        request,
        "step.html",
        pygments_css=pygments_css(),
        phase_names=PHASE_NAMES,
        run=run_json(run),
        project={"id": project.id, "name": project.name} if project else None,
        step=step_facts(step),
        items=collapse_started(items),
        earlier=items[0]["id"] if len(items) == PAGE_ITEMS else None,
        paged=before is not None,
        last_item=items[-1]["id"] if items else 0,
        diff=diff,
        sha=sha,
        finished=step.status in FINISHED_STEP,
    )


@console_page
async def step_diff(request: Request) -> Response:
    """The diff block alone, for the step page to insert when the step completes."""
    run, step, project = await _load_step(request)
    sha = (step.runtime_state or {}).get("commit_sha")
    diff = await load_diff(diff_sources(request, run, project), sha) if sha else None
    return render(request, "_diff.html", diff=diff, sha=sha)  # colours come with the page


async def _stream_access(request: Request) -> Response | None:
    """None when the caller may read the console; else the refusal to send."""
    access = await authenticate(request)
    if not isinstance(access, Access):
        return access
    if not access.admin:
        return JSONResponse({"error": "the console needs the API token"}, status_code=403)
    return None


def _stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        # no proxy buffering: each message must reach the browser when it is written
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def step_stream(request: Request) -> Response:
    """SSE: new transcript items (`item`), the step's numbers when they change (`step`), `end`."""
    refused = await _stream_access(request)
    if refused is not None:
        return refused
    try:
        run, step, _project = await _load_step(request)
        after = _cursor(request, "after") or 0
    except (LookupError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    last_id = request.headers.get("last-event-id", "")
    if last_id.isdigit():  # a reconnecting EventSource: carry on where it stopped
        after = max(after, int(last_id))
    db = _db(request)

    async def body() -> AsyncIterator[str]:
        cursor, sent, quiet = after, None, time.monotonic()
        deadline = time.monotonic() + STREAM_MAX_S
        while time.monotonic() < deadline:
            items = await transcript_page(
                db, step_run_id=step.id, after=cursor, limit=500, workdir=_workdir(run)
            )
            for item in items:
                yield sse("item", item, item["id"])
            if items:
                cursor, quiet = items[-1]["id"], time.monotonic()
            async with db.sessions() as session:
                current = await session.get(StepRun, step.id)
            if current is None:
                return
            facts = step_facts(current)
            if facts != sent:
                yield sse("step", facts)
                sent = facts
            if current.status in FINISHED_STEP and not items:
                yield sse("end", {"status": current.status})
                return
            if time.monotonic() - quiet > KEEPALIVE_S:
                yield ": keepalive\n\n"
                quiet = time.monotonic()
            await asyncio.sleep(STREAM_POLL_S)

    return _stream(body())


async def run_stream(request: Request) -> Response:
    """SSE for the protocol page: the run's state when it changes (`state`), new events
    (`event`)."""
    refused = await _stream_access(request)
    if refused is not None:
        return refused
    run_id = int(request.path_params["run_id"])
    if run_id > MAX_ID:
        return JSONResponse({"error": f"protocol run {run_id} does not exist"}, status_code=404)
    after = 0
    raw = request.query_params.get("after", "")
    if raw.isdigit():
        after = int(raw)
    db = _db(request)

    async def load() -> tuple[ProtocolRun | None, list[StepRun], list[Event]]:
        async with db.sessions() as session:
            run = await session.get(ProtocolRun, run_id)
            steps = list(
                (await session.execute(
                    select(StepRun).where(StepRun.protocol_run_id == run_id)
                    .order_by(StepRun.step_index).limit(1000))).scalars()
            )  # fmt: skip
            events = list(
                (await session.execute(
                    select(Event).where(Event.protocol_run_id == run_id, Event.id > cursor)
                    .order_by(Event.id).limit(200))).scalars()
            )  # fmt: skip
        return run, steps, events

    cursor = after

    async def body() -> AsyncIterator[str]:
        nonlocal cursor
        sent: dict[str, Any] | None = None
        deadline = time.monotonic() + STREAM_MAX_S
        quiet = time.monotonic()
        while time.monotonic() < deadline:
            run, steps, events = await load()
            if run is None:
                yield sse("end", {"error": "gone"})
                return
            for event in events:
                yield sse("event", event_json(event), event.id)
                cursor = event.id
            state = run_state(run, steps)
            state["run"].pop("updated_at", None)  # changes with every write; not worth a message
            if state != sent:
                yield sse("state", state)
                sent, quiet = state, time.monotonic()
            if time.monotonic() - quiet > KEEPALIVE_S:
                yield ": keepalive\n\n"
                quiet = time.monotonic()
            await asyncio.sleep(STREAM_POLL_S)

    return _stream(body())


async def transcript_api(request: Request) -> Response:
    """GET /api/steps/{step_id}/transcript: items oldest first (`after`), or a page `before`."""
    refused = await _stream_access(request)
    if refused is not None:
        return refused
    step_id = int(request.path_params["step_id"])
    if step_id > MAX_ID:
        return JSONResponse({"error": f"step {step_id} does not exist"}, status_code=404)
    try:
        after, before = _cursor(request, "after"), _cursor(request, "before")
        limit = min(int(request.query_params.get("limit", "200") or 200), 1000)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    async with _db(request).sessions() as session:
        step = await session.get(StepRun, step_id)
        run = await session.get(ProtocolRun, step.protocol_run_id) if step is not None else None
    if step is None or run is None:
        return JSONResponse({"error": f"step {step_id} does not exist"}, status_code=404)
    items = await transcript_page(
        _db(request),
        step_run_id=step_id,
        after=after or 0,
        before=before,
        limit=max(1, limit),
        workdir=_workdir(run),
    )
    return JSONResponse({"items": items, "next_after": items[-1]["id"] if items else after})


@console_page
async def run_page(request: Request) -> Response:
    run_id = _int(request, "run_id")
    async with _db(request).sessions() as session:
        run = await session.get(ProtocolRun, run_id)
        if run is None:
            raise LookupError(f"protocol run {run_id} does not exist")
        project = await session.get(Project, run.project_id)
        steps = list(
            (
                await session.execute(
                    select(StepRun)
                    .where(StepRun.protocol_run_id == run_id)
                    .order_by(StepRun.step_index)
                    .limit(1000)
                )
            ).scalars()
        )
        # the newest 50 events, shown oldest first; the page then tails with ?after=
        events = list(
            (
                await session.execute(
                    select(Event)
                    .where(Event.protocol_run_id == run_id)
                    .order_by(Event.id.desc())
                    .limit(50)
                )
            ).scalars()
        )
    events.reverse()
    return render(
        request,
        "run.html",
        run=run_json(run),
        project=project_json(project) if project else None,
        steps=[step_json(s) for s in steps],
        events=[event_json(e) for e in events],
        last_event=events[-1].id if events else 0,
        # the buttons valid in this state; the page's stream keeps them (and the rest) current
        buttons=(live := run_state(run, steps))["buttons"],
        live=live,
        all_actions=ACTIONS,
    )


def step_routes() -> list[BaseRoute]:
    return [
        Route("/console/protocols/{run_id:int}", run_page),
        Route("/console/protocols/{run_id:int}/steps/{step_index:int}", step_page),
        Route("/console/protocols/{run_id:int}/steps/{step_index:int}/diff", step_diff),
        Route("/console/protocols/{run_id:int}/steps/{step_index:int}/stream", step_stream),
        Route("/console/protocols/{run_id:int}/stream", run_stream),
    ]
