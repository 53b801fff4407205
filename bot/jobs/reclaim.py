"""reclaim_expired (cron): hand the work of a dead worker to a live one once its lease expired.

A step is `running` (or a protocol `planning`) only while a job holds the protocol's lease. When
the lease is gone and the status is still there, the worker died mid-job: a new job with a fresh
id picks the work up. It continues idempotently: the step's `[protocol-NNNN/XX]` commit of this
attempt is found and pushed instead of running the engine again. A QA run whose worker died is
taken back the same way: its committed report is reused, or the QA runs again. A step of a
graph the scheduler queued whose job was lost (nothing waits or runs for it) is queued again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq.jobs import Job, JobStatus
from sqlalchemy import select

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.env import JobEnv
from bot.jobs.locks import lease_alive, step_lease_alive
from bot.jobs.review import replies_due
from bot.jobs.schedule import schedule_ready, stalled
from bot.storage.models import ProtocolRun, StepRun
from bot.storage.runs import update_step

log = logging.getLogger(__name__)

# a run in one of these may hold a step (or its planning) that a dead worker left behind
_P = ProtocolStatus
ORPHAN_STATUSES = (_P.PLANNING, _P.RUNNING, _P.PAUSED, _P.CANCELLED, _P.BLOCKED)


async def orphaned_work(ctx: dict[str, Any]) -> list[tuple[int, int | None]]:
    """(run id, step index or None for planning) of work that no live lease covers."""
    async with ctx["db"].sessions() as session:
        rows = (
            await session.execute(
                select(ProtocolRun.id, ProtocolRun.status, StepRun.step_index)
                .outerjoin(
                    StepRun,
                    (StepRun.protocol_run_id == ProtocolRun.id)
                    & (StepRun.status == StepStatus.RUNNING),
                )
                .where(ProtocolRun.status.in_(ORPHAN_STATUSES))
                .where((ProtocolRun.status == ProtocolStatus.PLANNING) | (StepRun.id.is_not(None)))
            )
        ).all()
    found: list[tuple[int, int | None]] = []
    for run_id, status, step_index in rows:
        if await lease_alive(ctx["redis"], run_id):
            continue
        if step_index is not None and await step_lease_alive(ctx["redis"], run_id, step_index):
            continue  # a step of a graph, under its own lease
        found.append((run_id, None if status == ProtocolStatus.PLANNING else step_index))
    return found


async def orphaned_qa(ctx: dict[str, Any]) -> list[tuple[int, int]]:
    """(run id, step index) of QA runs that started and wrote no verdict, with no live lease.

    A step stays `needs_qa` while its QA runs; the mark `qa_running` (bot/jobs/quality.py) says
    a QA run is under way, so a QA whose worker died is told from a step waiting for /qa or CI.
    """
    async with ctx["db"].sessions() as session:
        rows = (
            await session.execute(
                select(ProtocolRun.id, StepRun.step_index, StepRun.runtime_state)
                .join(StepRun, StepRun.protocol_run_id == ProtocolRun.id)
                .where(
                    ProtocolRun.status == ProtocolStatus.RUNNING,
                    StepRun.status == StepStatus.NEEDS_QA,
                )
            )
        ).all()
    found: list[tuple[int, int]] = []
    for run_id, step_index, runtime_state in rows:
        if not isinstance((runtime_state or {}).get("qa_running"), str):
            continue
        if not await lease_alive(ctx["redis"], run_id):
            found.append((run_id, step_index))
    return found


Lost = tuple[int, int, int, dict[str, Any]]

# job states in which a queued step's job is still on its way to a worker, or running
_JOB_ALIVE = frozenset({JobStatus.deferred, JobStatus.queued, JobStatus.in_progress})


async def lost_queued_steps(ctx: dict[str, Any], now: float | None = None) -> list[Lost]:
    """(run id, step index, step id, its runtime state) of steps of a graph the scheduler queued
    whose job is gone: no such job waits or runs, and no lease covers the step. Such a step holds
    a slot under the bound for ever (it is counted as queued); its job is enqueued again. A grace
    of one lease period after queueing leaves the scheduler time to enqueue the job it just
    marked."""
    grace = max(1.0, ctx["settings"].lease_ttl_s)
    now = time.time() if now is None else now
    async with ctx["db"].sessions() as session:
        rows = (
            await session.execute(
                select(
                    ProtocolRun.id,
                    StepRun.step_index,
                    StepRun.id,
                    StepRun.retries,
                    StepRun.runtime_state,
                )
                .join(StepRun, StepRun.protocol_run_id == ProtocolRun.id)
                .where(
                    ProtocolRun.status == ProtocolStatus.RUNNING,
                    StepRun.status == StepStatus.PENDING,
                )
            )
        ).all()
    found: list[Lost] = []
    for run_id, step_index, step_id, retries, runtime_state in rows:
        rs = runtime_state or {}
        job_id, at = rs.get("queued_job"), rs.get("queued_at")
        if rs.get("queued_attempt") != retries or not isinstance(job_id, str):
            continue
        if not isinstance(at, int | float) or now - at < grace:
            continue
        if await Job(job_id, ctx["redis"]).status() in _JOB_ALIVE:
            continue
        if await step_lease_alive(ctx["redis"], run_id, step_index):
            continue
        found.append((run_id, step_index, step_id, dict(rs)))
    return found


async def reclaim_expired(ctx: dict[str, Any]) -> int:
    """Enqueue a job for every orphan; the job id changes once per lease period, so a job that is
    merely waiting in the queue is not duplicated on every tick."""
    period = int(time.time() // max(1.0, ctx["settings"].lease_ttl_s))
    count = 0
    for run_id, step_index in await orphaned_work(ctx):
        if step_index is None:
            await ctx["redis"].enqueue_job(
                "plan_protocol", _job_id=f"plan:{run_id}:reclaim:{period}", protocol_run_id=run_id
            )
        else:
            await ctx["redis"].enqueue_job(
                "execute_step",
                _job_id=f"exec:{run_id}:{step_index}:reclaim:{period}",
                protocol_run_id=run_id,
                step_index=step_index,
            )
        log.warning("protocol run %s: lease expired, work taken back (step %s)", run_id, step_index)
        count += 1
    for run_id, step_index, step_id, rs in await lost_queued_steps(ctx):
        job_id = f"exec:{run_id}:{step_index}:requeue:{period}"
        # the step's mark names its new job, so the next tick sees it waiting
        await update_step(
            ctx["db"], step_id, runtime_state={**rs, "queued_job": job_id, "queued_at": time.time()}
        )
        await ctx["redis"].enqueue_job(
            "execute_step", _job_id=job_id, protocol_run_id=run_id, step_index=step_index
        )
        log.warning(
            "protocol run %s: the queued job of step %s was lost, queued again", run_id, step_index
        )
        count += 1

    for run_id in await stalled(JobEnv.from_ctx(ctx)):
        # a graph waiting for a slot under the repository bound that freed without waking it
        if await schedule_ready(ctx, run_id):
            log.warning("protocol run %s: steps waiting for a slot started", run_id)
            count += 1
    for run_id, step_index in await orphaned_qa(ctx):
        # the QA run again: it finds the report a dead worker committed, or asks the engine anew
        await ctx["redis"].enqueue_job(
            "run_quality",
            _job_id=f"qa:{run_id}:{step_index}:reclaim:{period}",
            protocol_run_id=run_id,
            step_index=step_index,
            reclaim=True,
        )
        log.warning("protocol run %s: lease expired, QA of step %s taken back", run_id, step_index)
        count += 1

    for run_id, step_index in await replies_due(ctx):
        # a fix step pushed by a worker that died before answering every review thread
        await ctx["redis"].enqueue_job(
            "review_replies", _job_id=f"replies:{run_id}:{step_index}:{period}",
            protocol_run_id=run_id, step_index=step_index,
        )  # fmt: skip
        log.warning("protocol run %s: review replies of step %s taken back", run_id, step_index)
        count += 1
    return count
