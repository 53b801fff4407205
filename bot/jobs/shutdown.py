"""Graceful SIGTERM for `deksdenflow worker`: finish what fits in the grace period, hand back the
rest.

On SIGTERM (Kubernetes scaling in, draining a node, rolling out) a worker:

1. stops taking jobs at once;
2. lets running jobs go on for `worker_shutdown_grace_s`, so a step that finishes in time
   commits and pushes as usual;
3. then cancels the jobs still running. Cancelling a step's task kills the engine (the codex
   engine signals its whole process group on CancelledError), the protocol lock is released by
   its `finally`, and arq treats a cancelled job as "run again": it drops the in-progress key and
   leaves the job in the queue at its original score, so another worker picks it up on its next
   poll. The next run resets the worktree to the pushed branch head, which discards the
   interrupted attempt's uncommitted work (and the pod's emptyDir goes with the pod anyway).

All of this is arq's own mechanism (`job_completion_wait` + `retry_jobs`); this module holds the
numbers and the one rule that ties them to the Kubernetes manifests.
"""

from __future__ import annotations

import math
from typing import Any

from bot.core.settings import Settings
from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.advance import enqueue_next_step
from bot.storage.runs import load_run, set_protocol_status, update_run

# After the grace period: cancelling the engine (codex gets a few seconds between SIGTERM and
# SIGKILL), writing the hand-back to Redis and closing connections.
TERMINATION_MARGIN_S = 20


def shutdown_kwargs(settings: Settings) -> dict[str, Any]:
    """arq Worker arguments for a worker that owns its process's signals."""
    return {
        # arq's SIGTERM/SIGINT handler then stops picking jobs and waits this long before
        # cancelling (0 means: cancel at once, which arq's plain handler does)
        "job_completion_wait": math.ceil(settings.worker_shutdown_grace_s),
        # a cancelled job is re-queued, not failed: this is the hand-back
        "retry_jobs": True,
    }


def termination_grace_period_s(settings: Settings) -> int:
    """The pod's terminationGracePeriodSeconds that leaves room for the hand-back."""
    return math.ceil(settings.worker_shutdown_grace_s) + TERMINATION_MARGIN_S


async def resume_chain(ctx: dict[str, Any], run_id: int) -> None:
    """A job handed back after its work was done: queue what should follow it, once.

    A cancellation can land between a job's last state change and the enqueue of the next job
    (plan saved as `planned`, step set `completed`). The re-run then finds nothing to do and
    returns "skipped-…"; without this an auto-mode protocol would stop there. Only a pending
    step right after completed ones is queued (never one behind a running step), and job ids make
    a second enqueue a no-op.
    """
    db = ctx["db"]
    state = await load_run(db, run_id)
    if not state.run.auto_mode or state.run.status not in (
        ProtocolStatus.PLANNED,
        ProtocolStatus.RUNNING,
    ):
        return
    if not state.run.approved:
        await update_run(db, run_id, approved=True)
    first_open = next((s for s in state.steps if s.status != StepStatus.COMPLETED), None)
    if first_open is None:
        if state.run.status == ProtocolStatus.RUNNING:
            await set_protocol_status(db, run_id, ProtocolStatus.COMPLETED, "every step completed")
        return
    if first_open.status == StepStatus.PENDING:
        await enqueue_next_step(ctx, run_id)
