"""The job boundary: ctx → JobEnv, the protocol's lease, and no error left without a visible
state."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from arq import Retry

from bot import git as gitops
from bot.core.errors import GitError, LockBusy, StepStopped
from bot.domain.states import ProtocolStatus, StepStatus, stopped_step_status
from bot.git.runner import GitCommandFailed
from bot.jobs.common import MAX_TRIES, count_job
from bot.jobs.env import JobEnv
from bot.jobs.locks import lease
from bot.jobs.outcome import Check, Outcome, failure, write_outcome
from bot.jobs.placement import branch_for, lease_for
from bot.storage.runs import RunState, emit, load_run, run_branch

log = logging.getLogger(__name__)

Body = Callable[[JobEnv], Awaitable[str]]
WIPE_SETTLE_S = 0.5


async def guarded(
    ctx: dict[str, Any],
    job: str,
    run_id: int,
    step_index: int | None,
    body: Body,
    reply_to: dict[str, Any] | None = None,
) -> str:
    """Run `body` holding the protocol's lease; turn a stop or an error into a recorded outcome.

    A job that loses the race for the lease comes back shortly (arq Retry). Anything else that
    escapes the body ends as a failed step and a blocked protocol, with the reason on the status
    comment and the check run: a job never leaves a protocol `running` or `planning` with no
    one working on it. BaseException (a worker being killed) is not caught: the lease expires
    and the reclaim cron hands the work to another worker.
    """
    env = JobEnv.from_ctx(ctx)

    name, what = await lease_for(env, job, run_id, step_index)  # a graph's steps: one lease each
    try:
        async with lease(
            env.redis, name, what, env.settings.lease_ttl_s, env.settings.lease_renew_s
        ):
            generation = _generation(env)
            outcome = await _run_body(env, job, run_id, step_index, body, reply_to, generation)
    except LockBusy as exc:
        # another worker has this protocol: come back shortly instead of racing it
        raise Retry(defer=2) from exc
    await count_job(ctx, job, outcome)
    return outcome


def _generation(env: JobEnv) -> str | None:
    """The git cache's generation token when the job starts (None: a cache without one)."""
    generation = getattr(env.git, "generation", None)
    return str(generation()) if callable(generation) else None


async def _disk_lost(env: JobEnv, generation: str | None, exc: Exception) -> bool:
    """The worker's cache directory was wiped while the job ran, and another try remains."""
    if generation is None or int(env.ctx.get("job_try", 1)) >= MAX_TRIES:
        return False
    if env.git.lost_since(generation):
        return True
    if not isinstance(exc, OSError | GitError):
        return False
    # A wipe deletes files in directory order: the job may trip over a missing worktree file
    # while the generation marker is still there. A wipe of a few mirrors and worktrees takes
    # milliseconds; an error of the filesystem or git kind waits that long for it to show.
    await asyncio.sleep(WIPE_SETTLE_S)
    return bool(env.git.lost_since(generation))


async def _run_body(
    env: JobEnv,
    job: str,
    run_id: int,
    step_index: int | None,
    body: Body,
    reply_to: dict[str, Any] | None,
    generation: str | None = None,
) -> str:
    try:
        return await body(env)
    except StepStopped as exc:
        return await stopped(env, run_id, step_index, exc.protocol_status)
    except Retry:
        raise
    except Exception as exc:
        state = await load_run(env.db, run_id)
        if state.run.status in (ProtocolStatus.CANCELLED, ProtocolStatus.PAUSED):
            # a human stopped the protocol meanwhile (the error is likely its consequence)
            return await stopped(env, run_id, step_index, state.run.status)
        if await _disk_lost(env, generation, exc):
            # Whatever broke (a vanished worktree, a half-deleted mirror) says nothing about the
            # step: the disk went, as a node's emptyDir does. Run the job again, on a worktree
            # rebuilt from the pushed branch, instead of failing the step and blocking the run.
            log.warning(
                "%s of protocol run %s: the worker's disk was wiped under it (%s); trying again",
                job,
                run_id,
                _reason(exc),
            )
            if job == "execute_step" and step_index is not None:
                await _drop_attempt(env, state, step_index)
            raise Retry(defer=1) from exc
        log.warning("%s of protocol run %s failed", job, run_id, exc_info=True)
        if job == "execute_step" and step_index is not None:
            await _drop_attempt(env, state, step_index)
        outcome = failure(state, step_index, failure_line(job, step_index, exc))
        await write_outcome(
            env, state, step_index, _with_open_check(state, job, step_index, outcome), reply_to
        )
        return "failed"


def _with_open_check(
    state: RunState, job: str, step_index: int | None, outcome: Outcome
) -> Outcome:
    """The failure also ends the check run the job opened (in progress on the commit the attempt
    or the QA started from): the reason shows there, and nothing spins forever."""
    if step_index is None or job not in ("execute_step", "run_quality"):
        return outcome
    rs = state.step(step_index).runtime_state or {}
    kind: Literal["step", "qa"] = "qa" if job == "run_quality" else "step"
    head = rs.get("qa_running" if kind == "qa" else "attempt_head")
    if not isinstance(head, str) or outcome.step_to != StepStatus.FAILED:
        return outcome
    return dataclasses.replace(outcome, check=Check(kind, head, "failure"))


async def _drop_attempt(env: JobEnv, state: RunState, step_index: int) -> None:
    """A failed attempt leaves nothing behind: its unpushed commit and edits would otherwise be
    pushed with (or under) the next attempt's commit."""
    start = (state.step(step_index).runtime_state or {}).get("attempt_head")
    path = workdir_of(env, state, step_index)
    if not isinstance(start, str) or path is None or not path.is_dir():
        return
    try:
        timeout = env.settings.git_timeout_s
        await gitops.run_git(["reset", "--hard", "--quiet", start], cwd=path, timeout=timeout)
        await gitops.run_git(["clean", "-fd", "--quiet"], cwd=path, timeout=timeout)
    except Exception:  # the failure itself must still be recorded
        log.warning("could not reset the worktree of protocol run %s", state.run.id, exc_info=True)


def workdir_of(env: JobEnv, state: RunState, step_index: int | None) -> Path | None:
    """Where a job on this step worked: the protocol's worktree, or the step's own in a graph."""

    branch = branch_for(state, step_index)
    if branch != run_branch(state.run):
        path: Path = env.git.worktree_path(state.project.git_url, branch)
        return path
    return Path(state.run.worktree_path) if state.run.worktree_path else None


def failure_line(job: str, step_index: int | None, exc: BaseException) -> str:
    """One line for humans: what failed, and the first line of why."""
    what = "planning" if step_index is None else f"step {step_index:02d}"
    if job == "run_quality":
        what = f"QA of step {step_index:02d}"
    return f"{what} failed: {_reason(exc)}"[:300]


def git_verb(argv: list[str] | tuple[str, ...]) -> str:
    """The subcommand of a git command line: the first word after `git` and its options (the
    bot's `-c key=value` and `-C dir` pairs included)."""
    args = list(argv[1:]) if argv and argv[0].endswith("git") else list(argv)
    i = 0
    while i < len(args):
        if args[i] in ("-c", "-C"):
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            return args[i]
    return "git"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, GitCommandFailed):
        # the command line is long and says little; git's own first stderr line says why
        verb = git_verb(exc.argv)
        said = next((line.strip() for line in exc.stderr.splitlines() if line.strip()), "")
        return f"git {verb} failed (exit {exc.returncode}): {said}"
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}{': ' + detail if detail else ''}"


async def stopped(env: JobEnv, run_id: int, step_index: int | None, status: str) -> str:
    """A human stopped the protocol mid-job: drop the step's uncommitted work, say who stopped
    it."""
    state = await load_run(env.db, run_id)
    path = workdir_of(env, state, step_index)
    if path is not None and path.is_dir():
        await discard_changes(env, state, path)
    step_to = None
    if step_index is not None and state.step(step_index).status == StepStatus.RUNNING:
        step_to = stopped_step_status(state.run.status)
    message = (state.run.runtime_state or {}).get("message") or f"{status} by request"
    # a paused step runs again on /resume: mark it, so /resume knows which step stopped
    interrupted = {"interrupted": True} if step_to == StepStatus.PENDING else {}
    outcome = Outcome(
        message=str(message), step_to=step_to, event="step.stopped", step_state=interrupted
    )
    await write_outcome(env, state, step_index, outcome)
    return status


async def discard_changes(
    env: JobEnv, state: RunState, workdir: Path, step_index: int | None = None
) -> None:
    """Reset the worktree to its last commit: an interrupted attempt's edits must not be
    committed."""
    dirty = await gitops.status_porcelain(workdir)
    if not dirty:
        return
    timeout = env.settings.git_timeout_s
    await gitops.run_git(["reset", "--hard", "--quiet", "HEAD"], cwd=workdir, timeout=timeout)
    await gitops.run_git(["clean", "-fd", "--quiet"], cwd=workdir, timeout=timeout)
    step = state.step(step_index) if step_index is not None else None
    await emit(
        env.db,
        state,
        "worktree.cleaned",
        f"discarded {len(dirty)} uncommitted change(s) left by an interrupted attempt",
        step,
        paths=[e.path for e in dirty][:50],
    )
