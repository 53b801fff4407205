"""Where a step's job runs: on which branch and under which lease (a graph's steps: their own).

Split from schedule.py so that the job environment and the lease boundary, which schedule.py
itself builds on, can ask it without importing the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select

from bot.domain.graph import child_branch, runs_in_parallel
from bot.jobs.locks import step_lease_name
from bot.storage.models import ProtocolRun
from bot.storage.runs import RunState, run_branch

if TYPE_CHECKING:
    from bot.jobs.env import JobEnv


# built once: every step job asks it before taking its lease
_CONFIG = select(ProtocolRun.template_config).where(ProtocolRun.id == bindparam("run_id"))


def parallel(state: RunState) -> bool:
    return runs_in_parallel(state.run.template_config)


def branch_for(state: RunState, step_index: int | None) -> str:
    """The branch a job on this step works on: its child branch in a graph, else the protocol's."""
    if step_index is None or not parallel(state):
        return run_branch(state.run)  # the protocol's own branch, or the PR's it was planned on
    return child_branch(state.run.protocol_name, step_index)


async def lease_for(env: JobEnv, job: str, run_id: int, step_index: int | None) -> tuple[str, str]:
    """(lease name, what to call it): a step's own lease for the step jobs of a graph, else the
    protocol's lease, as before graphs existed."""
    if step_index is not None and job in ("execute_step", "run_quality"):
        async with env.db.one_read() as conn:
            config = await conn.scalar(_CONFIG, {"run_id": run_id})
        if runs_in_parallel(config):
            return step_lease_name(
                run_id, step_index
            ), f"step {step_index:02d} of protocol run {run_id}"
    return str(run_id), f"protocol run {run_id}"
