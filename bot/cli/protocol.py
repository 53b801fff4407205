"""`deksdenflow protocol …`: run protocols on a plain local repository through the Local forge."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot import git
from bot.cli.progress import Progress
from bot.core.errors import ConfigError, NotFound
from bot.core.settings import Settings
from bot.domain.pricing import fmt_cost
from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.actions import run_qa, run_step, start_protocol
from bot.jobs.local_runtime import drain, git_toplevel, local_project, local_runtime
from bot.storage.models import ForgeRecord, Project, ProtocolRun
from bot.storage.runs import load_run, update_run

FAILED = (ProtocolStatus.FAILED, ProtocolStatus.BLOCKED, ProtocolStatus.CANCELLED)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    proto = sub.add_parser("protocol", help="plan and run protocols on a local repository")
    psub = proto.add_subparsers(dest="protocol_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--repo", type=Path, default=Path("."), help="the git repository (default: .)"
        )
        p.add_argument("--engine", choices=["codex", "scripted"], help="engine for every phase")

    new = psub.add_parser("new", help="plan a new protocol for a task")
    new.add_argument("description", help="what the protocol should achieve")
    new.add_argument("--base", help="base branch (default: the repository's current branch)")
    new.add_argument(
        "--run-step", action="store_true", help="approve the plan and run its first step"
    )
    common(new)
    new.set_defaults(handler=_cmd_new)

    run = psub.add_parser("run-step", help="execute a step (default: the next one) and its QA")
    run.add_argument("protocol", help="protocol name or number, e.g. 0001-add-readme or 1")
    run.add_argument("step", nargs="?", type=int, help="step number (default: next)")
    common(run)
    run.set_defaults(handler=_cmd_run_step)

    qa = psub.add_parser("qa", help="run QA for a step (default: the one waiting for it)")
    qa.add_argument("protocol")
    qa.add_argument("step", nargs="?", type=int)
    common(qa)
    qa.set_defaults(handler=_cmd_qa)

    status = psub.add_parser("status", help="show protocols, or one protocol with its steps")
    status.add_argument("protocol", nargs="?")
    common(status)
    status.set_defaults(handler=_cmd_status)


def _settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    if getattr(args, "engine", None):
        return settings.model_copy(update={"engine": args.engine})
    return settings


async def _find_run(ctx: dict[str, Any], project_id: int, ref: str) -> ProtocolRun:
    async with ctx["db"].sessions() as session:
        runs = list(
            (
                await session.execute(
                    select(ProtocolRun).where(ProtocolRun.project_id == project_id)
                )
            ).scalars()
        )
    run: ProtocolRun
    for run in runs:
        if run.protocol_name == ref or (
            ref.isdigit() and run.protocol_name.startswith(f"{int(ref):04d}-")
        ):
            return run
    raise NotFound(f"no protocol {ref!r} in this repository (see `deksdenflow protocol status`)")


async def _drain(ctx: dict[str, Any], project_id: int, run_id: int) -> None:
    """Run the queued jobs, showing progress (in place on a terminal, lines otherwise)."""

    async with Progress(ctx["db"], run_id).running() as printer:
        await drain(ctx, project_id, printer=printer)


async def _finish(ctx: dict[str, Any], run_id: int) -> int:
    state = await load_run(ctx["db"], run_id)
    print(_render(state, await _records(ctx, state.project.id)))
    stuck = (StepStatus.FAILED, StepStatus.BLOCKED)
    if state.run.status in FAILED or any(s.status in stuck for s in state.steps):
        reason = (state.run.runtime_state or {}).get("message") or state.run.status
        print(f"\n✗ {state.run.protocol_name}: {reason}", file=sys.stderr)
        return 1
    name, base = state.run.protocol_name, state.run.base_branch
    print(
        f"\n✓ {name} is {state.run.status}; branch {name}"
        + (f"; {fmt_cost(state.run.cost_usd)}" if state.run.cost_usd else "")
        + f"\n  see the changes: git diff {base}...{name}",
        file=sys.stderr,
    )
    return 0


async def _new(args: argparse.Namespace, settings: Settings) -> int:
    async with local_runtime(_settings_for(args, settings)) as ctx:
        # everything that would strand a protocol in `planning` is checked before a row exists
        if args.base:
            await check_branch(ctx, await git_toplevel(args.repo), args.base)
        project = await local_project(ctx, args.repo, args.base)
        await check_can_start(ctx, project)
        run = await start_protocol(ctx, project, args.description, approved=args.run_step)
        print(
            f"planning {run.protocol_name} on {project.git_url} (base {project.base_branch})",
            file=sys.stderr,
        )
        await _drain(ctx, project.id, run.id)
        state = await load_run(ctx["db"], run.id)
        if args.run_step and state.run.status == ProtocolStatus.PLANNED:
            await run_step(ctx, run.id, None)
            await _drain(ctx, project.id, run.id)
        return await _finish(ctx, run.id)


def engine_problem(engine_id: str, known: list[str], codex_bin: str) -> str | None:
    """Why `engine_id` cannot run here, or None (pure but for the PATH lookup)."""
    if engine_id not in known:
        return f"unknown engine {engine_id!r} (known: {', '.join(known)})"
    if engine_id == "codex" and shutil.which(codex_bin) is None:
        return (
            f"engine codex is not installed: {codex_bin!r} was not found "
            "(install @openai/codex, set DEKSDENFLOW_CODEX_BIN, or use --engine scripted)"
        )
    return None


async def check_branch(ctx: dict[str, Any], repo: Path, branch: str) -> None:
    """ConfigError (one line) unless `branch` is a branch with a commit in `repo`."""

    found = await git.run_git(
        ["rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}"],
        cwd=repo,
        timeout=ctx["settings"].git_timeout_s,
        check=False,
    )
    if found.returncode != 0:
        raise ConfigError(f"base branch {branch!r} does not exist in {repo} (use --base BRANCH)")


async def check_can_start(ctx: dict[str, Any], project: Any) -> None:
    """ConfigError (one line) when the base branch is missing or the engine cannot run."""
    settings: Settings = ctx["settings"]
    await check_branch(ctx, Path(project.git_url), project.base_branch)
    models = project.default_models or {}
    engine_id = models.get("engine") if isinstance(models.get("engine"), str) else settings.engine
    problem = engine_problem(str(engine_id), list(ctx["engines"].ids()), settings.codex_bin)
    if problem is not None:
        raise ConfigError(problem)


async def _run_step(args: argparse.Namespace, settings: Settings) -> int:
    async with local_runtime(_settings_for(args, settings)) as ctx:
        project = await local_project(ctx, args.repo, None)
        run = await _find_run(ctx, project.id, args.protocol)
        # running a step from the CLI is the operator's approval of the plan
        await update_run(ctx["db"], run.id, approved=True)
        index = await run_step(ctx, run.id, args.step)
        print(f"running step {index:02d} of {run.protocol_name}", file=sys.stderr)
        await _drain(ctx, project.id, run.id)
        return await _finish(ctx, run.id)


async def _qa(args: argparse.Namespace, settings: Settings) -> int:
    async with local_runtime(_settings_for(args, settings)) as ctx:
        project = await local_project(ctx, args.repo, None)
        run = await _find_run(ctx, project.id, args.protocol)
        index = await run_qa(ctx, run.id, args.step)
        print(f"QA of step {index:02d} of {run.protocol_name}", file=sys.stderr)
        await _drain(ctx, project.id, run.id)
        return await _finish(ctx, run.id)


async def _records(ctx: dict[str, Any], project_id: int) -> list[ForgeRecord]:
    async with ctx["db"].sessions() as session:
        return list(
            (
                await session.execute(
                    select(ForgeRecord).where(ForgeRecord.project_id == project_id)
                )
            ).scalars()
        )


def _render(state: Any, records: list[ForgeRecord]) -> str:
    run = state.run
    lines = [f"{run.protocol_name}  [{run.status}]  tokens={run.tokens_used}  {run.description}"]
    for step in state.steps:
        verdict = (step.runtime_state or {}).get("qa_verdict") or ""
        lines.append(
            f"  {step.step_index:02d} {step.status:<10} {verdict:<5} {step.tokens_used:>7} tok  "
            f"{step.summary or step.step_name}"
        )
    for rec in records:
        if rec.kind == "pull" and rec.key == run.protocol_name:
            lines.append(f"  draft PR: {rec.data.get('title')} ({rec.data.get('state')})")
        if rec.kind == "check" and run.head_sha and rec.key.startswith(run.head_sha):
            lines.append(
                f"  check {rec.data.get('name')}: {rec.data.get('status')} "
                f"{rec.data.get('conclusion') or ''}"
            )
    return "\n".join(lines)


async def _status_everywhere(ctx: dict[str, Any], ref: str | None) -> int:
    """`protocol status` outside a repository: the protocols of every local repository."""
    async with ctx["db"].sessions() as session:
        rows = list(
            (await session.execute(
                select(ProtocolRun, Project).join(Project, Project.id == ProtocolRun.project_id)
                .where(Project.provider == "local").order_by(Project.id, ProtocolRun.id)
            )).all()
        )  # fmt: skip
    if ref is not None:
        prefix = f"{int(ref):04d}-" if ref.isdigit() else f"{ref}-"
        found = [
            (r, p) for r, p in rows if r.protocol_name == ref or r.protocol_name.startswith(prefix)
        ]
        if not found:
            raise NotFound(f"no protocol {ref!r} in any local repository")
        for run, project in found:
            state = await load_run(ctx["db"], run.id)
            print(f"{project.git_url}\n" + _render(state, await _records(ctx, project.id)))
        return 0
    if not rows:
        print('no protocols yet: `deksdenflow protocol new "<task>"` in a repository')
    current = None
    for run, project in rows:
        if project.git_url != current:
            print(project.git_url)
            current = project.git_url
        print(f"  {run.protocol_name:<40} {run.status:<10} tokens={run.tokens_used}")
    return 0


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with local_runtime(settings) as ctx:
        if args.repo == Path("."):
            try:
                await git_toplevel(args.repo)
            except ConfigError:  # not in a repository: show them all
                return await _status_everywhere(ctx, args.protocol)
        project = await local_project(ctx, args.repo, None)
        records = await _records(ctx, project.id)
        if args.protocol:
            run = await _find_run(ctx, project.id, args.protocol)
            state = await load_run(ctx["db"], run.id)
            print(_render(state, records))
            status = next(
                (r for r in records if r.kind == "status_comment" and run.protocol_name in r.key),
                None,
            )
            if status is not None:
                print("\n--- status comment ---\n" + status.body)
            return 0
        async with ctx["db"].sessions() as session:
            runs = list(
                (
                    await session.execute(
                        select(ProtocolRun)
                        .where(ProtocolRun.project_id == project.id)
                        .order_by(ProtocolRun.id)
                    )
                ).scalars()
            )
        if not runs:
            print('no protocols yet: `deksdenflow protocol new "<task>"`')
        for run in runs:
            print(f"{run.protocol_name:<40} {run.status:<10} tokens={run.tokens_used}")
        return 0


def _cmd_new(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_new(args, settings))


def _cmd_run_step(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run_step(args, settings))


def _cmd_qa(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_qa(args, settings))


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_status(args, settings))
