"""Steps side by side: which steps of a graph start, on which branch, under which lease.

A protocol whose plan is the plain chain runs as it always did: one branch, one worktree, one
lease for the protocol. Any other graph runs its steps on child branches `NNNN-task--XX`, each
in its own worktree under its own lease; a step's branch is cut from the protocol branch when
the step starts, and merged back into it when the step has passed its gates (integrate.py).
Starting steps and merging them happen under one short lock per protocol (the integration
lock), so two workers never merge into one protocol branch at once and the bound on steps
running side by side is counted by one worker at a time. The repository's bound spans its
protocols: counting the slots and marking the chosen steps queued happen under one short lock
per repository (the slots lock), so two protocols scheduling at the same moment cannot both
count the other's slots as free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select

from bot import git as gitops
from bot.core.errors import DependenciesPending, LockBusy, TransitionConflict
from bot.domain.graph import (
    StepView,
    active_steps,
    dependencies_of_config,
    missing_dependencies,
    ready_steps,
    runs_in_parallel,
    to_start,
)
from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs import integrate
from bot.jobs.boundary import failure_line
from bot.jobs.env import JobEnv
from bot.jobs.feedback import publish_state
from bot.jobs.gating import gating
from bot.jobs.integrate import integrated
from bot.jobs.locks import acquire, release
from bot.jobs.placement import parallel
from bot.jobs.ready import announce_ready
from bot.storage.models import ProtocolRun, StepRun
from bot.storage.runs import (
    RunState,
    emit,
    load_run,
    set_protocol_status,
    update_run,
    update_step,
)

log = logging.getLogger(__name__)

INTEGRATION_LOCK_TTL_S = 120.0
INTEGRATION_WAIT_S = 300.0
SLOTS_LOCK_TTL_S = 30.0  # held for a count and a few UPDATEs; a dead holder frees it this soon


def queued(step: StepRun) -> bool:
    """A pending step the scheduler already handed to the queue (this attempt)."""
    return (
        step.status == StepStatus.PENDING
        and (step.runtime_state or {}).get("queued_attempt") == step.retries
    )


def views(state: RunState) -> dict[int, StepView]:
    par = parallel(state)
    return {s.step_index: StepView(s.status, integrated(s) if par else True) for s in state.steps}


def missing_for(state: RunState, step_index: int) -> tuple[int, ...]:
    """The dependencies of a step that are not done yet (for `/run-step N`)."""
    return missing_dependencies(
        dependencies_of_config(state.run.template_config), views(state), step_index
    )


def all_done(state: RunState) -> bool:
    return all(v.status == StepStatus.COMPLETED and v.integrated for v in views(state).values())


@contextlib.asynccontextmanager
async def _waited_lock(env: JobEnv, name: str, ttl_s: float, what: str) -> AsyncIterator[None]:
    """A short Redis lock, waited for (its holders keep it briefly); LockBusy past the wait."""
    deadline = time.monotonic() + INTEGRATION_WAIT_S
    while (token := await acquire(env.redis, name, ttl_s)) is None:
        if time.monotonic() > deadline:
            raise LockBusy(f"{what} stayed taken")
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        await asyncio.shield(release(env.redis, name, token))


def integration_lock(env: JobEnv, run_id: int) -> contextlib.AbstractAsyncContextManager[None]:
    """The protocol's short lock for merging and starting steps; waits for it (merges are short)."""
    return _waited_lock(
        env,
        f"{run_id}:integrate",
        INTEGRATION_LOCK_TTL_S,
        f"the integration lock of protocol run {run_id}",
    )


def slots_lock(env: JobEnv, project_id: int) -> contextlib.AbstractAsyncContextManager[None]:
    """The repository's lock for counting its step slots and claiming some (always taken inside
    a protocol's integration lock, never the other way round: no two holders wait on each other)."""
    return _waited_lock(
        env,
        f"project-{project_id}:slots",
        SLOTS_LOCK_TTL_S,
        f"the step-slots lock of project {project_id}",
    )


async def bound(env: JobEnv, state: RunState) -> int:
    """How many steps of this protocol may be active: its bound (the repository's policy, else the
    setting), less what the repository's other protocols hold beyond the repository bound (their
    started steps and the ones queued for a worker). May be 0: the protocol then waits for a
    slot, and is woken when one frees (`wake_siblings`, and the reclaim cron's sweep)."""
    policies = (state.project.config or {}).get("policies") or {}
    per_protocol = policies.get("max_parallel_steps") or env.settings.max_parallel_steps
    elsewhere = await held_elsewhere(env, state.project.id, state.run.id)
    room = env.settings.max_parallel_steps_per_repo - elsewhere
    return max(0, min(int(per_protocol), room))


async def held_elsewhere(env: JobEnv, project_id: int, run_id: int | None) -> int:
    """Slots the project's protocols other than `run_id` hold: started steps, and pending steps
    the scheduler queued (a queued step holds its slot before a worker takes it)."""
    async with env.db.sessions() as session:
        steps = (
            await session.execute(
                select(StepRun)
                .join(ProtocolRun, ProtocolRun.id == StepRun.protocol_run_id)
                .where(ProtocolRun.project_id == project_id, ProtocolRun.id != (run_id or 0))
                .where(ProtocolRun.status.in_((ProtocolStatus.PLANNED, ProtocolStatus.RUNNING)))
                .where(
                    StepRun.status.in_(
                        (StepStatus.RUNNING, StepStatus.NEEDS_QA, StepStatus.PENDING)
                    )
                )
            )
        ).scalars()
        return sum(1 for s in steps if s.status != StepStatus.PENDING or queued(s))


async def siblings_waiting(env: JobEnv, project_id: int, run_id: int | None) -> list[int]:
    """Other auto protocols of the project that run a graph: those a freed slot may let go on."""
    async with env.db.sessions() as session:
        rows = (
            await session.execute(
                select(ProtocolRun.id, ProtocolRun.template_config)
                .where(ProtocolRun.project_id == project_id, ProtocolRun.id != (run_id or 0))
                .where(ProtocolRun.status.in_((ProtocolStatus.PLANNED, ProtocolStatus.RUNNING)))
                .where(ProtocolRun.auto_mode.is_(True), ProtocolRun.approved.is_(True))
                .order_by(ProtocolRun.id)
            )
        ).all()
    return [rid for rid, config in rows if runs_in_parallel(config)]


async def stalled(env: JobEnv) -> list[int]:
    """Auto protocols running a graph with pending steps and nothing started or queued: they
    wait for a slot under the repository bound that freed without waking them (a step that
    failed, a protocol cancelled). The reclaim cron schedules them again."""
    async with env.db.sessions() as session:
        runs = (
            await session.execute(
                select(ProtocolRun.id, ProtocolRun.template_config)
                .where(ProtocolRun.status.in_((ProtocolStatus.PLANNED, ProtocolStatus.RUNNING)))
                .where(ProtocolRun.auto_mode.is_(True), ProtocolRun.approved.is_(True))
            )
        ).all()
        found: list[int] = []
        for run_id, config in runs:
            if not runs_in_parallel(config):
                continue
            steps = (
                (await session.execute(select(StepRun).where(StepRun.protocol_run_id == run_id)))
                .scalars()
                .all()
            )
            busy = any(
                s.status in (StepStatus.RUNNING, StepStatus.NEEDS_QA) or queued(s) for s in steps
            )
            if not busy and any(s.status == StepStatus.PENDING for s in steps):
                found.append(run_id)
    return found


async def wake_siblings(ctx: dict[str, Any], project_id: int, run_id: int | None) -> list[int]:
    """A slot freed under the repository bound: the other auto protocols of the repository start
    their ready steps (oldest first, each under its own integration lock); the ones that did."""
    env = JobEnv.from_ctx(ctx)
    woken: list[int] = []
    for other in await siblings_waiting(env, project_id, run_id):
        if await schedule_ready(ctx, other):
            woken.append(other)
    return woken


async def schedule_ready(ctx: dict[str, Any], run_id: int, start: bool = True) -> list[int]:
    """Start every ready step of a graph, up to the bound (start=False: only merge what passed);
    the steps started."""
    env = JobEnv.from_ctx(ctx)
    async with integration_lock(env, run_id):
        return await start_ready(env, await load_run(env.db, run_id), start)


async def run_step(
    ctx: dict[str, Any], state: RunState, step_index: int | None, reply_to: dict[str, Any] | None
) -> int:
    """`/run-step N` in a graph: N once its dependencies are done; `/run-step next`: every ready
    step up to the bound (the first one's number is returned)."""

    if step_index is None:
        if state.run.status in (ProtocolStatus.BLOCKED, ProtocolStatus.FAILED):
            raise TransitionConflict(
                "ProtocolRun", state.run.id, state.run.status, ProtocolStatus.RUNNING
            )
        started = await schedule_ready(ctx, state.run.id)
        if not started:
            raise TransitionConflict(
                "ProtocolRun", state.run.id, state.run.status, ProtocolStatus.RUNNING
            )
        return started[0]
    step = state.step(step_index)
    missing = missing_for(state, step_index)
    if missing:
        raise DependenciesPending(step_index, missing)
    if step.status == StepStatus.RUNNING:
        raise TransitionConflict("step", step_index, step.status, StepStatus.RUNNING)
    await JobEnv.from_ctx(ctx).enqueue(
        "execute_step",
        f"exec:{state.run.id}:{step_index}:{time.time_ns()}",
        protocol_run_id=state.run.id,
        step_index=step_index,
        reply_to=reply_to,
    )
    return step_index


async def start_ready(env: JobEnv, state: RunState, start: bool = True) -> list[int]:
    """Under the integration lock: merge what passed and was not merged yet (a crash, an
    `/approve`), then enqueue the ready steps that fit under the bound."""
    if (
        state.run.status not in (ProtocolStatus.PLANNED, ProtocolStatus.RUNNING)
        or not state.run.approved
    ):
        return []

    for step in state.steps:
        if (
            step.status == StepStatus.COMPLETED
            and not integrated(step)
            and not integrate.waits_for_integration(step)
        ):
            await integrate.integrate_step(env, state, step.step_index)
            state = await load_run(env.db, state.run.id)
    if all_done(state):
        await complete(env, state)
        return []
    if not start:
        return []
    deps = dependencies_of_config(state.run.template_config)
    now = views(state)
    active = len(active_steps(now)) + sum(1 for s in state.steps if queued(s))
    ready = [i for i in ready_steps(deps, now) if not queued(state.step(i))]
    async with slots_lock(env, state.project.id):
        # counted and claimed in one hold: another protocol's count then sees these as taken
        chosen = to_start(ready, active, await bound(env, state))
        if chosen and state.run.status == ProtocolStatus.PLANNED:
            # one transition here, not one per step: steps starting at once would race for it
            await set_protocol_status(
                env.db, state.run.id, ProtocolStatus.RUNNING, "running steps side by side"
            )
        jobs = [await _mark_queued(env, state.step(index)) for index in chosen]
    for index, job_id in zip(chosen, jobs, strict=True):
        await env.enqueue("execute_step", job_id, protocol_run_id=state.run.id, step_index=index)
    return chosen


async def _mark_queued(env: JobEnv, step: StepRun) -> str:
    """Mark a pending step handed to the queue (it holds its slot from now on); its job's id.
    The job's id and time let the reclaim cron find a queued step whose job was lost."""
    job_id = f"exec:{step.protocol_run_id}:{step.step_index}:{step.retries}"
    queued_mark = {"queued_attempt": step.retries, "queued_job": job_id, "queued_at": time.time()}
    await update_step(env.db, step.id, runtime_state={**(step.runtime_state or {}), **queued_mark})
    return job_id


async def complete(env: JobEnv, state: RunState) -> None:
    """Every step is merged: the protocol is complete, once CI is green on the protocol branch
    where the repository has CI (each step's CI judged its child branch, not the merges)."""
    if state.run.status != ProtocolStatus.RUNNING:
        return

    head = (
        await _pushed_head(env, state)
        if (state.run.runtime_state or {}).get("ci_red")
        else state.run.head_sha
    )
    if (
        gating(state.project, env.settings)
        and head
        and (state.run.runtime_state or {}).get("ci_green") != head
    ):
        rs = {**(state.run.runtime_state or {}), "awaiting_ci": head}
        await update_run(env.db, state.run.id, runtime_state=rs)
        await emit(
            env.db,
            state,
            "protocol.awaiting_ci",
            f"every step merged; waiting for CI on {head[:12]}",
        )
        return
    await set_protocol_status(
        env.db, state.run.id, ProtocolStatus.COMPLETED, "every step completed and merged"
    )
    state.run.status = ProtocolStatus.COMPLETED

    await announce_ready(env.ctx, state)  # un-draft the PR/MR and say what comes next


def about_protocol_head(run: ProtocolRun, sha: str | None) -> bool:
    """Whether CI on `sha` is about the protocol branch after the merges of a graph: the head it
    waits for, or the red head that blocked it (a re-run of CI there may unblock it)."""
    rs = run.runtime_state or {}
    heads = (rs.get("awaiting_ci"), rs.get("ci_red"))
    return bool(sha) and runs_in_parallel(run.template_config) and sha in heads


def blocked_on_protocol_ci(state: RunState) -> bool:
    """Blocked by red CI on the protocol branch after every step was merged (no step failed)."""
    red = (state.run.runtime_state or {}).get("ci_red")
    return parallel(state) and state.run.status == ProtocolStatus.BLOCKED and bool(red)


async def _pushed_head(env: JobEnv, state: RunState) -> str | None:
    """After red CI on the merged head, someone may have pushed a fix onto the protocol branch:
    its head on the forge is the one CI must pass, if it contains the merged work (a rewritten
    branch that dropped it is not adopted: CI is awaited on the merged head again)."""

    merged = state.run.head_sha
    workdir = await env.worktree(state)  # at the remote branch head
    head = await gitops.head_sha(workdir)
    if not merged or head == merged:
        return merged
    contains = await gitops.run_git(
        ["merge-base", "--is-ancestor", merged, head],
        cwd=workdir,
        timeout=env.settings.git_timeout_s,
        check=False,
    )
    if contains.returncode != 0:
        return merged
    await update_run(env.db, state.run.id, head_sha=head)
    state.run.head_sha = head
    await emit(
        env.db,
        state,
        "protocol.head",
        f"the protocol branch moved to {head[:12]}: CI is awaited there",
    )
    return head


async def protocol_ci(
    ctx: dict[str, Any], state: RunState, sha: str, result: str, failing: list[tuple[str, str]]
) -> str | None:
    """CI on the protocol branch after the last merge: it completes or blocks the protocol, and a
    green re-run on the head that blocked it completes it after all (no state where only /cancel
    helps). None when the result is not about that commit (the step gates take it)."""
    rs = state.run.runtime_state or {}
    if not parallel(state) or not sha:
        return None
    waiting = state.run.status == ProtocolStatus.RUNNING and rs.get("awaiting_ci") == sha
    rerun = state.run.status == ProtocolStatus.BLOCKED and rs.get("ci_red") == sha
    if not (waiting or rerun):
        return None
    env = JobEnv.from_ctx(ctx)
    if result == "success":
        fresh = {k: v for k, v in rs.items() if k not in ("ci_red", "message")}
        fresh.update(ci_green=sha, awaiting_ci=None)
        if rerun:
            again = "CI on the protocol branch is green again"
            await set_protocol_status(
                env.db, state.run.id, ProtocolStatus.RUNNING, again, runtime_state=fresh
            )
        else:
            await update_run(env.db, state.run.id, runtime_state=fresh)
        state = await load_run(env.db, state.run.id)
        await complete(env, state)
        return "complete"
    if rerun:  # red again: it stays blocked with the reason it has
        still = f"CI on the protocol branch is still red on {sha[:12]}"
        await emit(env.db, state, "ci.failure", still, sha=sha)
        return "blocked"
    names = ", ".join(n for n, _ in failing[:5]) or "a check"
    message = (
        f"CI failed on the protocol branch after the steps were merged ({names} on {sha[:12]}); "
        "a green re-run of CI there, or /resume after it, completes the protocol"
    )
    rs = {**rs, "message": message, "ci_red": sha}
    await set_protocol_status(
        env.db, state.run.id, ProtocolStatus.BLOCKED, message, runtime_state=rs
    )
    await publish_state(ctx, await load_run(env.db, state.run.id), message)
    return "blocked"


async def _integrate_or_block(
    env: JobEnv, state: RunState, step_index: int, merged: list[str]
) -> bool:
    """Merge the step; a merge that fails for another reason than a conflict (a rejected push,
    a broken ref) blocks the protocol with the reason instead of leaving it running unmerged.
    Once unblocked, the next scheduling pass merges the step again."""

    try:
        await integrate.integrate_step(env, state, step_index, merged)
        return True
    except Exception as exc:
        log.warning(
            "merging step %s of protocol run %s failed", step_index, state.run.id, exc_info=True
        )
        message = failure_line("integrate", step_index, exc).replace(
            f"step {step_index:02d} failed",
            f"merging step {step_index:02d} into the protocol branch failed",
            1,
        )
        rs = {**(state.run.runtime_state or {}), "message": message}
        if state.run.status == ProtocolStatus.RUNNING:
            await set_protocol_status(
                env.db, state.run.id, ProtocolStatus.BLOCKED, message, runtime_state=rs
            )
        await publish_state(env.ctx, await load_run(env.db, state.run.id), message)
        return False


async def after_step_passed(ctx: dict[str, Any], run_id: int, step_index: int) -> None:
    """A step of a graph passed its gates: merge it, then start what became ready."""
    env = JobEnv.from_ctx(ctx)

    merged: list[str] = []
    async with integration_lock(env, run_id):
        state = await load_run(env.db, run_id)
        if state.run.status == ProtocolStatus.CANCELLED:
            return
        if not await _integrate_or_block(env, state, step_index, merged):
            return
        state = await load_run(env.db, run_id)
        if all_done(state):
            await complete(env, state)
        elif state.run.auto_mode:
            await start_ready(env, state)
    state = await load_run(env.db, run_id)
    await publish_state(ctx, state)
    # the step's slot is free: under the repository bound, another protocol may be waiting for it
    await wake_siblings(ctx, state.project.id, run_id)
    for branch in merged:  # after the lock: the next steps are already on their way
        await integrate.drop_child(env, state, branch)
