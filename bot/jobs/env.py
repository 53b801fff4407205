"""JobEnv: the services a protocol job uses, read out of arq's ctx once, at the job boundary."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot import git as gitops
from bot.core.settings import Settings
from bot.jobs.placement import branch_for, parallel
from bot.storage.db import Database
from bot.storage.runs import RunState, run_branch, update_run

CrashHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class JobEnv:
    """Typed access to the worker's services; `ctx` stays for the feedback helpers that take it."""

    ctx: dict[str, Any]
    settings: Settings
    db: Database
    redis: Any
    forges: Any
    git: Any
    engines: Any
    crash_hook: CrashHook | None = None

    @classmethod
    def from_ctx(cls, ctx: dict[str, Any]) -> JobEnv:
        """The one place that knows arq's ctx keys."""
        return cls(
            ctx=ctx,
            settings=ctx["settings"],
            db=ctx["db"],
            redis=ctx["redis"],
            forges=ctx["forges"],
            git=ctx["git"],
            engines=ctx["engines"],
            crash_hook=ctx.get("crash_hook"),
        )

    def crash_point(self, where: str, run_id: int, step_index: int) -> None:
        """Tests stand for a worker dying here; a no-op in production."""
        if self.crash_hook is not None:
            self.crash_hook(where, run_id, step_index)

    async def enqueue(self, function: str, job_id: str, **kwargs: Any) -> None:
        await self.redis.enqueue_job(function, _job_id=job_id, **kwargs)

    def auth(self, state: RunState) -> Callable[[], Awaitable[str | None]]:
        """An auth provider for this project: the git layer asks it right before each fetch and
        push, so no job holds a token across an engine run."""
        forge = self.forges.forge_for(state.project)
        repo = self.forges.repo_ref(state.project)

        async def header() -> str | None:
            fresh: str | None = await forge.git_auth_header(repo)
            return fresh

        return header

    async def worktree(self, state: RunState, step_index: int | None = None) -> Path:
        """The protocol's worktree at its branch head (any worker may run any job); a step of a
        graph gets its own, on its child branch cut from the protocol branch (jobs/schedule.py)."""
        path, _head = await self.checkout(state, step_index)
        return path

    async def checkout(self, state: RunState, step_index: int | None = None) -> tuple[Path, str]:
        """worktree() and the commit it was left at: the cache already knows it, so a job that
        needs the head need not ask git again."""
        branch = branch_for(state, step_index)
        if branch != run_branch(state.run):
            child = await self.git.ensure_worktree(
                state.project.git_url, branch, run_branch(state.run), self.auth(state)
            )
            return Path(child.path), str(child.head)
        # A protocol without a graph reads no remote branch but its own and the base: fetch only
        # those. A graph's jobs merge its steps' child branches (jobs/integrate.py), which a PR
        # branch's pattern would not cover: they fetch everything, as before.
        wt = await self.git.ensure_worktree(
            state.project.git_url,
            run_branch(state.run),
            state.run.base_branch,
            self.auth(state),
            narrow=not parallel(state),
        )
        path = Path(wt.path)
        if state.run.worktree_path != str(path):
            await update_run(self.db, state.run.id, worktree_path=str(path))
            state.run.worktree_path = str(path)
        return path, str(wt.head)

    async def push(self, state: RunState, workdir: Path, step_index: int | None = None) -> str:
        """Push the protocol branch (or the step's child branch) with credentials fetched now,
        not before the engine ran."""
        return (await self.push_commits(state, workdir, step_index)).sha

    async def push_commits(
        self, state: RunState, workdir: Path, step_index: int | None = None
    ) -> gitops.Pushed:
        """push(), also with what HEAD's commit changed (read by the push's secret scan)."""
        pushed: gitops.Pushed = await gitops.push_commits(
            workdir,
            branch_for(state, step_index),
            state.project.git_url,
            self.auth(state),
            credential_hosts=self.git.credential_hosts,
        )
        return pushed
