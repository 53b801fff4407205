"""`deksdenflow setup` and `deksdenflow codemachine import`: onboarding commands for a local
repository."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bot.codemachine.importer import import_workspace, read_workspace_dir
from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.git import commit_all, head_sha
from bot.git.onboarding import (
    SETUP_BRANCH,
    LocalSetupReport,
    git,
    is_git_repo,
    repo_warnings,
    write_starter_files,
)
from bot.jobs.local_runtime import drain, local_project, local_runtime
from bot.jobs.onboard import DISCOVERY_COMMIT, SETUP_COMMIT, run_discovery
from bot.storage.runs import load_run, record_event


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    setup = sub.add_parser(
        "setup",
        help="add .deksdenflow.yml, .protocols/README.md and CI hooks to a local repository",
    )
    setup.add_argument("--repo", type=Path, default=Path("."), help="the repository (default: .)")
    setup.add_argument("--base", help="base branch (default: the current branch, else main)")
    setup.add_argument(
        "--init-if-needed",
        action="store_true",
        help="run `git init -b BASE` when REPO is not a git repository",
    )
    setup.add_argument(
        "--force", action="store_true", help="overwrite existing files (each is kept as <file>.bak)"
    )
    setup.add_argument(
        "--run-discovery",
        action="store_true",
        help=f"let the engine fill the CI hooks, committed on the {SETUP_BRANCH} branch for review",
    )
    setup.add_argument("--engine", choices=["codex", "scripted"], help="engine for discovery")
    setup.set_defaults(handler=_cmd_setup)

    cm = sub.add_parser("codemachine", help="import CodeMachine workspaces as protocols")
    cmsub = cm.add_subparsers(dest="codemachine_command", required=True, metavar="ACTION")
    imp = cmsub.add_parser("import", help="turn a CodeMachine workspace into a protocol run")
    imp.add_argument(
        "path", type=Path, help="the CodeMachine workspace (config/, templates/workflows/)"
    )
    imp.add_argument(
        "--repo", type=Path, default=Path("."), help="the repository to run it on (default: .)"
    )
    imp.add_argument("--base", help="base branch (default: the repository's current branch)")
    imp.add_argument(
        "--workflow", help="workflow template name (default: the selected or only one)"
    )
    imp.add_argument(
        "--engine", help="engine for steps that name none (default: the configured engine)"
    )
    imp.set_defaults(handler=_cmd_codemachine_import)


def _settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    if getattr(args, "engine", None) and args.engine in ("codex", "scripted"):
        return settings.model_copy(update={"engine": args.engine})
    return settings


async def _current_branch(root: Path) -> str | None:
    code, out = await git(root, "symbolic-ref", "--short", "HEAD", check=False)
    return out.strip() or None if code == 0 else None


async def _has_commits(root: Path) -> bool:
    code, _ = await git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    return code == 0


async def local_setup(
    settings: Settings,
    root: Path,
    *,
    base: str | None = None,
    init_if_needed: bool = False,
    force: bool = False,
    discovery: bool = False,
    ctx: dict[str, Any] | None = None,
) -> LocalSetupReport:
    """The `setup` command's work, callable from tests; events go to the settings' database."""

    root = await asyncio.to_thread(root.resolve)
    initialized = False
    if not await is_git_repo(root):
        if not init_if_needed:
            raise ConfigError(
                f"{root} is not a git repository (pass --init-if-needed to run git init)"
            )
        root.mkdir(parents=True, exist_ok=True)
        await git(root, "init", "-q", "-b", base or "main")
        initialized = True
    top = Path((await git(root, "rev-parse", "--show-toplevel"))[1].strip())
    base = base or await _current_branch(top) or "main"

    async def work(rt: dict[str, Any]) -> LocalSetupReport:
        project = await local_project(rt, top, base)
        if discovery and await _has_commits(top):
            report = await _setup_on_branch(rt, top, base, force, project)
        else:
            report = write_starter_files(top, force=force)
            if discovery:
                report.warnings.append(
                    "the repository has no commit yet: discovery edited the working tree directly"
                )
                before = _snapshot(top)
                await run_discovery(rt, top, repo=top.name, base_branch=base, project=project)
                after = _snapshot(top)
                report.discovery_changed = sorted(
                    p for p in set(before) | set(after) if before.get(p) != after.get(p)
                )
        report.initialized = initialized
        report.warnings += await repo_warnings(top, base)
        await record_event(
            rt["db"],
            "project.setup_local",
            f"setup: {len(report.created)} created, {len(report.kept)} kept, "
            f"{len(report.overwritten)} overwritten",
            project_id=project.id,
            metadata={
                "created": report.created,
                "kept": report.kept,
                "overwritten": report.overwritten,
                "warnings": report.warnings,
                "initialized": initialized,
                "discovery": report.discovery_changed,
                "branch": report.discovery_branch,
            },
        )
        return report

    if ctx is not None:
        return await work(ctx)
    async with local_runtime(settings) as rt:
        return await work(rt)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes outside .git (only used on a repository without commits: small)."""
    found: dict[str, bytes] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] == ".git" or not path.is_file():
            continue
        found[rel.as_posix()] = path.read_bytes()
    return found


async def _setup_on_branch(
    ctx: dict[str, Any], top: Path, base: str, force: bool, project: Any
) -> LocalSetupReport:
    """Starter files + discovery committed on the setup branch in a separate worktree.

    The user's checkout is left untouched: the result is a branch to review and merge.
    """
    settings: Settings = ctx["settings"]
    code, _ = await git(
        top, "rev-parse", "--verify", "--quiet", f"refs/heads/{SETUP_BRANCH}", check=False
    )
    if code == 0:
        raise ConfigError(
            f"branch {SETUP_BRANCH} already exists: merge or delete it "
            f"(git branch -D {SETUP_BRANCH}) first"
        )
    with tempfile.TemporaryDirectory(prefix="deksdenflow-setup-") as tmp:
        wt = Path(tmp) / "wt"
        await git(top, "worktree", "add", "-q", "-b", SETUP_BRANCH, str(wt), base)
        try:
            report = write_starter_files(wt, force=force)
            await commit_all(wt, SETUP_COMMIT, settings.bot_name, settings.bot_email)
            before = await head_sha(wt)
            await run_discovery(ctx, wt, repo=top.name, base_branch=base, project=project)
            await commit_all(wt, DISCOVERY_COMMIT, settings.bot_name, settings.bot_email)
            _, out = await git(wt, "diff", "--name-only", before, "HEAD")
            report.discovery_changed = [line for line in out.splitlines() if line]
            report.discovery_branch = SETUP_BRANCH
        finally:
            await git(top, "worktree", "remove", "--force", str(wt), check=False)
    return report


def _print_report(report: LocalSetupReport, root: Path, base: str | None) -> None:
    out = sys.stdout
    if report.initialized:
        print(f"initialized a git repository in {root}", file=out)
    where = f" on branch {report.discovery_branch}" if report.discovery_branch else ""
    for path in report.created:
        print(f"created   {path}{where}", file=out)
    for path in report.overwritten:
        print(f"replaced  {path} (backup: {path}.bak){where}", file=out)
    for path in report.kept:
        print(f"kept      {path} (exists; --force replaces it)", file=out)
    if report.discovery_changed is not None:
        print(f"discovery changed: {', '.join(report.discovery_changed) or 'nothing'}", file=out)
        if report.discovery_branch:
            print(
                f"review with: git diff {base or 'main'}...{report.discovery_branch}, "
                "then merge it",
                file=out,
            )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _cmd_setup(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(
        local_setup(
            _settings_for(args, settings),
            args.repo,
            base=args.base,
            init_if_needed=args.init_if_needed,
            force=args.force,
            discovery=args.run_discovery,
        )
    )
    _print_report(report, args.repo, args.base)
    return 0


async def import_local(
    settings: Any,
    workspace: Path,
    repo: Path,
    *,
    base: str | None = None,
    workflow: str | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """`deksdenflow codemachine import`: import into a local repository and write its branch."""
    files = read_workspace_dir(workspace)
    async with local_runtime(settings) as ctx:
        project = await local_project(ctx, repo, base)
        run, plan = await import_workspace(ctx, project, files, workflow=workflow, engine=engine)
        await drain(ctx, project.id)
        state = await load_run(ctx["db"], run.id)
        return {
            "protocol_run_id": run.id,
            "protocol": run.protocol_name,
            "status": state.run.status,
            "workflow": plan.workflow,
            "steps": [s["file"] for s in plan.spec["steps"]],
            "warnings": plan.warnings,
        }


def _cmd_codemachine_import(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(
        import_local(
            _settings_for(args, settings),
            args.path,
            args.repo,
            base=args.base,
            workflow=args.workflow,
            engine=args.engine,
        )
    )
    print(json.dumps(result, indent=2))
    return 0
