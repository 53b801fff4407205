"""A stateful property test of the step runner (hypothesis RuleBasedStateMachine).

Local forge, scripted engine, SQLite, the in-process queue. Rules interleave commands (run-step,
qa, retry, approve N, pause, resume, cancel), CI results, engine failures, push rejections,
/cancel or /pause arriving while the engine runs, and workers killed before or after the step
commit or the QA-report commit. CI results land on a step's own commit, its QA-report commit,
the head, or an unknown sha, told once or by two webhook kinds of one run. After every rule the
queue is drained, and the five invariants of issue #11 are checked: no running step (or QA
under way) without a lease, at most one commit per step attempt, every CI verdict on the step
whose commit it ran on, no commit after a cancel, and a command that acts from every state.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import stat
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import select

from bot.core.errors import DeksdenFlowError
from bot.domain.states import (
    ProtocolStatus,
    StepStatus,
    can_transition_protocol,
    may_approve_step,
    may_start_step,
    resume_decision,
)
from bot.jobs import actions
from bot.jobs.ci import apply_ci_result
from bot.jobs.local_runtime import drain
from bot.jobs.locks import lease_alive, step_lease_alive
from bot.jobs.quality import qa_in_progress
from bot.jobs.reclaim import reclaim_expired
from bot.jobs.steps import execute_step, run_quality
from bot.storage.models import Event
from bot.storage.runs import get_or_create_project, load_run
from engines.base import EngineRequest, EngineResult
from engines.registry import EngineRegistry
from engines.scripted import ScriptedEngine
from tests.gitutil import git, make_origin
from tests.protocol.conftest import protocol_settings, quiet, scripted_script

SCRIPT = scripted_script(
    planning={
        "steps": [
            {
                "slug": f"step-{i}",
                "title": f"Step {i}",
                "content": f"# Step {i}\n",
                "qa_policy": "light",
            }
            for i in (1, 2)
        ]
    },
    execute={"default": {"files": [{"path": "work/{step_index}.txt", "append": "x\n"}]}},
)

TRAILER = re.compile(r"\[protocol-\d{4}/(\d{2})(?:-qa)?\]")


class Killed(BaseException):
    """A worker dying: no except clause of the job sees it."""


class ChaosEngine(ScriptedEngine):
    """The scripted engine plus what the rules ask of the next execute call."""

    def __init__(self) -> None:
        super().__init__(SCRIPT)
        self.fail_next = False
        self.stop_next: str | None = None
        self.ctx: dict[str, Any] = {}
        self.run_id = 0

    async def run(self, request: EngineRequest) -> EngineResult:
        if request.phase == "execute" and self.fail_next:
            self.fail_next = False
            return EngineResult(outcome="failed", exit_code=1, error="chaos: engine failed")
        if request.phase == "execute" and self.stop_next:
            how, self.stop_next = self.stop_next, None
            # a human stops the protocol while the engine is busy: the runner must kill the turn
            await getattr(actions, how)(self.ctx, self.run_id, by="chaos")
            await asyncio.sleep(30)
        return await super().run(request)


class StepRunnerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="df-stateful-"))
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.engine = ChaosEngine()
        self.cancelled_head: str | None = None
        self.owners: dict[str, int | None] = {}
        self.cached: Any = None
        self.ctx, self.run_id, self.origin = self.loop.run_until_complete(self._setup())

    async def _setup(self) -> tuple[dict[str, Any], int, Path]:
        from bot.jobs.local_runtime import local_runtime

        origin = make_origin(self.tmp, readme="# chaos\n")
        config = protocol_settings(self.tmp, stop_poll_s=0.05)
        ctx = await self.stack.enter_async_context(local_runtime(config))
        ctx["engines"] = EngineRegistry([self.engine])
        project = await get_or_create_project(
            ctx["db"],
            name=f"local:{origin}",
            provider="local",
            git_url=str(origin),
            base_branch="main",
        )
        run = await actions.start_protocol(ctx, project, "Chaos", approved=True)
        await drain(ctx, project.id, printer=quiet)
        self.engine.ctx, self.engine.run_id = ctx, run.id
        return ctx, run.id, origin

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.stack.aclose())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _do(self, work: Any) -> Any:
        async def go() -> Any:
            try:
                return await work
            except DeksdenFlowError:  # a refused command (409/404) is an allowed answer
                return None
            finally:
                await drain(self.ctx, None, printer=quiet)
                self.cached = None

        return self.loop.run_until_complete(go())

    def _state(self) -> Any:
        """The run as the last rule left it (loaded once per rule: the invariants share it)."""
        if self.cached is None:
            self.cached = self.loop.run_until_complete(load_run(self.ctx["db"], self.run_id))
        return self.cached

    def _branch_head(self) -> str | None:
        name = self._state().run.protocol_name
        try:
            return git("rev-parse", f"refs/heads/{name}", cwd=self.origin).strip()
        except Exception:
            return None

    # -- commands ---------------------------------------------------------------------------

    @rule(step=st.sampled_from([None, 1, 2]))
    def run_step(self, step: int | None) -> None:
        self._do(actions.run_step(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([None, 1, 2]))
    def qa(self, step: int | None) -> None:
        self._do(actions.run_qa(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([None, 1, 2]))
    def retry(self, step: int | None) -> None:
        self._do(actions.retry(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([1, 2]))
    def approve(self, step: int) -> None:
        self._do(actions.approve(self.ctx, self.run_id, step))

    @rule()
    def pause(self) -> None:
        self._do(actions.pause(self.ctx, self.run_id, by="tester"))

    @rule()
    def resume(self) -> None:
        self._do(actions.resume(self.ctx, self.run_id))

    @rule(dice=st.integers(0, 3))
    def cancel(self, dice: int) -> None:
        if dice:  # cancel ends an example: keep it rarer than the other commands
            return
        self._do(actions.cancel(self.ctx, self.run_id, by="tester"))
        self._remember_cancel()

    # -- the world misbehaving ---------------------------------------------------------------

    @rule(
        result=st.sampled_from(["success", "failure"]),
        on=st.sampled_from(["head", "newest", "step-1", "step-2", "qa-1", "qa-2", "stale"]),
        kinds=st.sampled_from(
            [("workflow_run",), ("check_suite",), ("workflow_run", "check_suite"), ("status",) * 2]
        ),
    )
    def ci(self, result: str, on: str, kinds: tuple[str, ...]) -> None:
        """A CI result on some commit (a step's own, its QA report's, the head, an unknown one),
        told by one webhook or by two kinds of webhook for the same run."""
        state = self._state()
        sha: str | None
        if on == "head":
            sha = state.run.head_sha
        elif on == "newest":  # a CI event without a sha: the newest step's head
            sha = None
        elif on == "stale":
            sha = "0" * 40
        else:
            kind, index = on.split("-")
            sha = (state.step(int(index)).runtime_state or {}).get(
                "qa_commit" if kind == "qa" else "commit_sha"
            )
            if sha is None:
                return
        for source in kinds:
            self._do(
                apply_ci_result(
                    self.ctx,
                    self.run_id,
                    sha,
                    result,  # type: ignore[arg-type]
                    [("tests", "failure")],
                    source=source,
                )
            )

    @rule(step=st.sampled_from([None, 1, 2]))
    def engine_fails(self, step: int | None) -> None:
        self.engine.fail_next = True
        self._do(actions.run_step(self.ctx, self.run_id, step))
        self.engine.fail_next = False

    @rule(how=st.sampled_from(["cancel", "pause", "pause", "pause"]))
    def stop_during_engine(self, how: str) -> None:
        self.engine.stop_next = how
        self._do(actions.run_step(self.ctx, self.run_id, None))
        self.engine.stop_next = None
        if how == "cancel":
            self._remember_cancel()

    @rule(step=st.sampled_from([None, 1, 2]))
    def push_rejected(self, step: int | None) -> None:
        hook = self.origin / "hooks" / "pre-receive"
        hook.write_text('#!/bin/sh\nrm -f -- "$0"\necho rejected >&2\nexit 1\n')
        hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
        self._do(actions.run_step(self.ctx, self.run_id, step))
        hook.unlink(missing_ok=True)

    @rule(where=st.sampled_from(["before_commit", "after_commit"]))
    def worker_killed(self, where: str) -> None:
        state = self._state()
        runnable = [
            s
            for s in state.steps
            if s.status in (StepStatus.PENDING, StepStatus.FAILED, StepStatus.BLOCKED)
        ]
        if not runnable or state.run.status not in (
            ProtocolStatus.RUNNING,
            ProtocolStatus.PLANNED,
            ProtocolStatus.BLOCKED,
        ):
            return

        def die(at: str, _run: int, _step: int) -> None:
            if at == where:
                raise Killed()

        self.ctx["crash_hook"] = die
        self.cached = None
        try:
            self.loop.run_until_complete(
                execute_step(
                    self.ctx, protocol_run_id=self.run_id, step_index=runnable[0].step_index
                )
            )
        except Killed:
            pass
        except DeksdenFlowError:
            pass
        finally:
            self.ctx.pop("crash_hook", None)
        # the lease is gone (expired, in real life): the reclaim cron hands the step on
        self._do(reclaim_expired(self.ctx))

    @rule(where=st.sampled_from(["qa_before_commit", "qa_after_commit"]))
    def qa_worker_killed(self, where: str) -> None:
        state = self._state()
        waiting = [s for s in state.steps if s.status == StepStatus.NEEDS_QA]
        if not waiting or state.run.status not in (
            ProtocolStatus.RUNNING,
            ProtocolStatus.PLANNED,
            ProtocolStatus.BLOCKED,
        ):
            return

        def die(at: str, _run: int, _step: int) -> None:
            if at == where:
                raise Killed()

        self.ctx["crash_hook"] = die
        self.cached = None
        try:
            self.loop.run_until_complete(
                run_quality(self.ctx, protocol_run_id=self.run_id, step_index=waiting[0].step_index)
            )
        except Killed:
            pass
        except DeksdenFlowError:
            pass
        finally:
            self.ctx.pop("crash_hook", None)
        self._do(reclaim_expired(self.ctx))

    def _remember_cancel(self) -> None:
        if self._state().run.status == ProtocolStatus.CANCELLED and self.cancelled_head is None:
            self.cancelled_head = self._branch_head()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_running_step_without_a_lease(self) -> None:
        state = self._state()
        event(f"protocol {state.run.status}")
        for s in state.steps:
            event(f"step {s.step_index} {s.status}")
        alive = self.loop.run_until_complete(lease_alive(self.ctx["redis"], self.run_id))
        running = [s.step_index for s in state.steps if s.status == StepStatus.RUNNING]
        assert not running or alive, f"steps {running} running without a lease ({state.run.status})"
        # a QA under way (started, no verdict yet) is covered by a lease too, or reclaimed
        in_qa = [
            s.step_index
            for s in state.steps
            if s.status == StepStatus.NEEDS_QA and qa_in_progress(s)
        ]
        assert state.run.status != ProtocolStatus.RUNNING or not in_qa or alive, (
            f"QA of {in_qa} without a lease"
        )

    @invariant()
    def at_most_one_commit_per_step_attempt(self) -> None:
        state = self._state()
        name = state.run.protocol_name
        subjects = (
            git("log", "--format=%s", f"refs/heads/{name}", cwd=self.origin).splitlines()
            if self._branch_head()
            else []
        )
        for step in state.steps:
            marker = f"[protocol-0001/{step.step_index:02d}]"
            commits = sum(1 for s in subjects if marker in s)
            assert commits <= step.retries + 1, (step.step_index, commits, step.retries, subjects)

    @invariant()
    def a_cancelled_protocol_gets_no_new_commits(self) -> None:
        if self.cancelled_head is not None:
            assert self._branch_head() == self.cancelled_head

    @invariant()
    def every_ci_verdict_is_attributed_to_the_step_whose_commit_it_ran_on(self) -> None:
        """The truth is the commit itself: its `[protocol-0001/NN]` (or `…/NN-qa]`) trailer."""
        state = self._state()
        by_id = {s.id: s.step_index for s in state.steps}
        for e in self.loop.run_until_complete(self._ci_events()):
            sha = (e.metadata_ or {}).get("sha")
            if not sha:  # "no step has run yet": no commit, no verdict
                assert e.event_type == "ci.ignored" and e.step_run_id is None, (
                    e.event_type,
                    e.message,
                )
                continue
            owner = self._owner_of(str(sha))
            blamed = by_id.get(e.step_run_id) if e.step_run_id is not None else None
            if e.event_type in (
                "ci.success",
                "ci.failure",
                "ci.duplicate",
            ):  # a decision (or its repeat)
                assert owner is not None and blamed == owner, (
                    e.event_type,
                    e.message,
                    sha,
                    owner,
                    blamed,
                )
            else:  # stale or ignored: attributed to no step, or to the commit's own
                assert blamed is None or blamed == owner, (
                    e.event_type,
                    e.message,
                    sha,
                    owner,
                    blamed,
                )

    async def _ci_events(self) -> list[Event]:
        async with self.ctx["db"].sessions() as session:
            rows = await session.execute(
                select(Event).where(
                    Event.protocol_run_id == self.run_id, Event.event_type.like("ci.%")
                )
            )
            return list(rows.scalars())

    def _owner_of(self, sha: str) -> int | None:
        """The step whose commit `sha` is, read from the commit (on the remote or in the
        worktree)."""
        if sha not in self.owners:
            self.owners[sha] = None
            for where in (self.origin, Path(self._state().run.worktree_path or self.origin)):
                try:
                    subject = git("log", "-1", "--format=%s", sha, "--", cwd=where)
                except Exception:
                    continue
                found = TRAILER.search(subject)
                self.owners[sha] = int(found.group(1)) if found else None
                break
        return self.owners[sha]

    @invariant()
    def some_command_makes_progress(self) -> None:
        """From every non-terminal state some command acts: the pure decisions the commands use."""
        state = self._state()
        status = state.run.status
        steps = [(s.step_index, s.status) for s in state.steps]
        assert status not in (ProtocolStatus.PENDING, ProtocolStatus.PLANNING), "planning stranded"
        if status in (ProtocolStatus.COMPLETED, ProtocolStatus.CANCELLED):
            return
        assert any(v != "completed" for _, v in steps), f"{status} with every step completed"
        assert not any(v == "running" for _, v in steps), (
            f"a step running after the queue drained: {steps}"
        )
        if status == ProtocolStatus.PAUSED:  # /resume
            assert can_transition_protocol(status, ProtocolStatus.RUNNING)
            return
        # /run-step, /retry N or /approve N has a step to act on …
        actionable = [i for i, v in steps if v == "pending" or may_approve_step(v)]
        assert actionable, (status, steps)
        if status in (
            ProtocolStatus.BLOCKED,
            ProtocolStatus.FAILED,
        ):  # … and /resume or /retry puts the protocol back to work
            assert can_transition_protocol(status, ProtocolStatus.RUNNING)
            assert resume_decision(steps, auto_mode=False).action != "nothing" or any(
                v == "pending" for _, v in steps
            )
        else:
            for index in actionable:
                start = may_start_step(status, True, dict(steps)[index])
                assert start.action in ("start", "skip"), (status, steps, start)


StepRunnerMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=12,
    # one example (setup + a dozen rules) takes 1-4 s here; a stuck one fails instead of hanging
    deadline=timedelta(seconds=30),
    suppress_health_check=[HealthCheck.too_slow],
)
TestStepRunner = StepRunnerMachine.TestCase


# -- parallel steps (issue #17): the same runner with a plan that is a graph ---------------------

DIAMOND_DEPS: dict[int, tuple[int, ...]] = {1: (), 2: (1,), 3: (1,), 4: (2, 3)}
DIAMOND_SCRIPT = scripted_script(
    planning={
        "steps": [
            {
                "slug": f"step-{i}",
                "title": f"Step {i}",
                "content": f"# Step {i}\n",
                "qa_policy": "skip",
                "depends_on": list(DIAMOND_DEPS[i]) if i > 1 else None,
            }
            for i in (1, 2, 3, 4)
        ]
    },
    execute={
        "default": {"files": [{"path": "work/{step_index}.txt", "append": "x\n"}], "delay_s": 0.05}
    },
)


class GraphEngine(ScriptedEngine):
    """The scripted engine that notes every execute call whose step's dependencies were not all
    completed and merged when it started, and fails the next call when asked."""

    def __init__(self) -> None:
        super().__init__(DIAMOND_SCRIPT)
        self.ctx: dict[str, Any] = {}
        self.run_id = 0
        self.fail_next = False
        self.early: list[tuple[int, list[int]]] = []

    async def run(self, request: EngineRequest) -> EngineResult:
        if request.phase == "execute":
            index = int(request.context.get("step_index", 0))
            state = await load_run(self.ctx["db"], self.run_id)
            missing = [
                d
                for d in DIAMOND_DEPS.get(index, ())
                if state.step(d).status != StepStatus.COMPLETED
                or (state.step(d).runtime_state or {}).get("integrated_attempt")
                != state.step(d).retries
            ]
            if missing:
                self.early.append((index, missing))
            if self.fail_next:
                self.fail_next = False
                return EngineResult(outcome="failed", exit_code=1, error="chaos: engine failed")
        return await super().run(request)


class ParallelStepMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="df-stateful-graph-"))
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.engine = GraphEngine()
        self.integrating = 0
        self.overlaps = 0
        self.ctx, self.run_id = self.loop.run_until_complete(self._setup())

    async def _setup(self) -> tuple[dict[str, Any], int]:
        from bot.jobs import integrate
        from bot.jobs.local_runtime import local_runtime

        original = integrate.integrate_step

        async def counted(
            env: Any, state: Any, step_index: int, merged: list[str] | None = None
        ) -> str:
            # the real integration, counted: two at once in one protocol is the bug looked for
            self.integrating += 1
            self.overlaps += self.integrating > 1
            try:
                await asyncio.sleep(0.01)  # widen the window a second integration would need
                return await original(env, state, step_index, merged)
            finally:
                self.integrating -= 1

        self.stack.callback(setattr, integrate, "integrate_step", original)
        integrate.integrate_step = counted
        origin = make_origin(self.tmp, readme="# graph\n")
        config = protocol_settings(self.tmp, stop_poll_s=0.05)
        ctx = await self.stack.enter_async_context(local_runtime(config))
        ctx["engines"] = EngineRegistry([self.engine])
        project = await get_or_create_project(
            ctx["db"],
            name=f"local:{origin}",
            provider="local",
            git_url=str(origin),
            base_branch="main",
        )
        run = await actions.start_protocol(ctx, project, "Graph", approved=True)
        await drain(ctx, project.id, printer=quiet)
        self.engine.ctx, self.engine.run_id = ctx, run.id
        return ctx, run.id

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.stack.aclose())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _do(self, work: Any) -> Any:
        async def go() -> Any:
            try:
                return await work
            except DeksdenFlowError:
                return None
            finally:
                await drain(self.ctx, None, printer=quiet)

        return self.loop.run_until_complete(go())

    def _state(self) -> Any:
        return self.loop.run_until_complete(load_run(self.ctx["db"], self.run_id))

    @rule(step=st.sampled_from([None, None, 1, 2, 3, 4]))
    def run_step(self, step: int | None) -> None:
        self._do(actions.run_step(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([None, 1, 2, 3, 4]))
    def retry(self, step: int | None) -> None:
        self._do(actions.retry(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([1, 2, 3, 4]))
    def approve(self, step: int) -> None:
        self._do(actions.approve(self.ctx, self.run_id, step))

    @rule(step=st.sampled_from([None, 2, 3]))
    def engine_fails(self, step: int | None) -> None:
        self.engine.fail_next = True
        self._do(actions.run_step(self.ctx, self.run_id, step))
        self.engine.fail_next = False

    @rule()
    def pause_and_resume(self) -> None:
        self._do(actions.pause(self.ctx, self.run_id, by="tester"))
        self._do(actions.resume(self.ctx, self.run_id))

    @invariant()
    def no_step_starts_before_its_dependencies_complete(self) -> None:
        state = self._state()
        event(f"graph protocol {state.run.status}")
        assert not self.engine.early, self.engine.early

    @invariant()
    def no_two_integrations_of_one_protocol_at_once(self) -> None:
        assert self.overlaps == 0

    @invariant()
    def nothing_runs_without_its_lease(self) -> None:
        state = self._state()
        for s in state.steps:
            if s.status == StepStatus.RUNNING:
                alive = self.loop.run_until_complete(
                    step_lease_alive(self.ctx["redis"], self.run_id, s.step_index)
                )
                assert alive, f"step {s.step_index} running without its lease"


ParallelStepMachine.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=10,
    deadline=timedelta(seconds=30),
    suppress_health_check=[HealthCheck.too_slow],
)
TestParallelSteps = ParallelStepMachine.TestCase
