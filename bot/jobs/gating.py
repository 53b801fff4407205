"""The CI gate as jobs meet it: its lock, whether CI gates a project, and QA's completion.

Split from bot/jobs/ci.py so that the jobs which execute and judge steps do not import the CI loop,
which itself drives those jobs: the dependency runs one way, ci → jobs → this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from bot.core.errors import LockBusy, SpecError
from bot.domain.ci_gate import GateOutcome, StepCI, gate_after_qa, step_ci
from bot.domain.loop_policy import ci_gates, repo_policies
from bot.domain.states import StepStatus, allowed_step_sources
from bot.jobs.locks import acquire, release
from bot.jobs.specs import spec_of
from bot.storage.models import StepRun
from bot.storage.runs import KnownRow, RunState, emit, load_run, transition, update_step

# One short lock per protocol serialises the two places that may complete a step on its gates:
# a CI result arriving and a QA verdict being written. Without it each could read the other's
# state just before it was written, and both would wait for ever.
GATE_WAIT_S = 30.0


@contextlib.asynccontextmanager
async def gate_lock(redis: Any, run_id: int) -> AsyncIterator[None]:
    """Hold the run's CI-gate lock (seconds, never across an engine call)."""
    name = f"ci-gate:{run_id}"
    deadline = time.monotonic() + GATE_WAIT_S
    while (token := await acquire(redis, name, 60)) is None:
        if time.monotonic() > deadline:
            raise LockBusy(f"the CI gate of protocol run {run_id} stayed busy")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        await release(redis, name, token)


def has_ci(project: Any) -> bool:
    """A repository has CI when project setup found a CI config on its base branch
    (`.github/workflows/`, `.gitlab-ci.yml`) or when any CI result was ever reported for it."""
    return bool(getattr(project, "ci_provider", None))


def gating(project: Any, settings: Any) -> bool:
    """CI gates this project's steps: it has CI, and neither `.deksdenflow.yml`
    (`policies.ci_gates`) nor the environment (DEKSDENFLOW_CI_GATES) turned that off."""
    default = bool(getattr(settings, "ci_gates", True))
    return has_ci(project) and ci_gates(repo_policies(getattr(project, "config", None)), default)


def step_views(state: RunState) -> list[StepCI]:
    try:
        policies = {s.index: s.qa.policy for s in spec_of(state).steps}
    except SpecError:
        policies = {}
    return [step_ci(s, policies.get(s.step_index)) for s in state.steps]


async def complete_after_qa(ctx: dict[str, Any], run_id: int, step_index: int) -> GateOutcome:
    """QA passed: complete the step, unless the repository has CI and CI on this attempt is not
    green yet (the step then stays `needs_qa` with the pass remembered; green CI completes it)."""
    db = ctx["db"]
    async with gate_lock(ctx["redis"], run_id):
        state = await load_run(db, run_id)
        step = state.step(step_index)
        rs = dict(step.runtime_state or {})
        rs["qa_passed_on"] = rs.get("commit_sha") or ""
        step.runtime_state = rs
        view = next(v for v in step_views(state) if v.index == step_index)
        outcome = gate_after_qa(view, gating(state.project, ctx.get("settings")))
        if outcome == "completed":  # the pass and the completion: one transaction, rows known
            async with db.sessions.begin() as session:
                await transition(
                    session,
                    StepRun,
                    step.id,
                    StepStatus.COMPLETED,
                    allowed_step_sources(StepStatus.COMPLETED),
                    values={"runtime_state": rs},
                    event_message="QA passed",
                    known=KnownRow(status=step.status, run_id=run_id, project_id=state.project.id),
                )
            return outcome
        await update_step(db, step.id, runtime_state=rs)
        if outcome == "waiting-ci":
            await emit(
                db,
                state,
                "step.waiting-ci",
                f"step {step_index:02d}: QA passed; waiting for CI",
                step,
            )
    return outcome
