"""The embedded demo: a local repository and one protocol run end to end by the scripted engine."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot.core.errors import GitError
from bot.jobs.actions import start_protocol
from bot.storage.models import ProtocolRun
from bot.storage.runs import get_or_create_project

log = logging.getLogger(__name__)

DEMO_TASK = "Add a friendly greeting module"


async def _git(*args: str, cwd: Path | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    if proc.returncode != 0:
        raise GitError(f"git {args[0]} failed: {err.decode(errors='replace').strip()}")


async def seed_demo_repo(data_dir: Path) -> Path:
    """A bare 'remote' with one commit on main (idempotent): what a forge's repository would be."""
    remote = (data_dir / "demo" / "origin.git").resolve()
    if (remote / "HEAD").exists():
        return remote
    seed = data_dir / "demo" / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    await _git("init", "--bare", "-b", "main", str(remote))
    await _git("init", "-b", "main", cwd=seed)
    (seed / "README.md").write_text(
        "# Demo repository\n\nA tiny project DeksdenFlow works on in the demo.\n"
    )
    await _git("add", ".", cwd=seed)
    await _git(
        "-c",
        "user.name=DeksdenFlow demo",
        "-c",
        "user.email=demo@deksdenflow.invalid",
        "commit",
        "-q",
        "-m",
        "Initial commit",
        cwd=seed,
    )
    await _git("push", "-q", str(remote), "main", cwd=seed)
    return remote


async def existing_demo_run(db: Any, project_id: int) -> ProtocolRun | None:
    """The demo project's first protocol, if an earlier start made one."""
    async with db.sessions() as session:
        found = await session.execute(
            select(ProtocolRun).where(ProtocolRun.project_id == project_id).order_by(ProtocolRun.id)
        )
        run: ProtocolRun | None = found.scalars().first()
        return run


async def start_demo(ctx: dict[str, Any], port: int) -> str:
    """Seed the repository, register it, and start one auto-approved protocol on it."""

    settings = ctx["settings"]
    remote = await seed_demo_repo(settings.data_dir)
    project = await get_or_create_project(
        ctx["db"],
        name="demo",
        provider="local",
        git_url=str(remote),
        base_branch="main",
        default_models={"engine": "scripted"},
    )
    run = await existing_demo_run(ctx["db"], project.id)
    if run is None:
        run = await start_protocol(ctx, project, DEMO_TASK, auto=True)
        headline = (
            f"Demo: protocol {run.protocol_name} is running on {remote} with the scripted engine."
        )
    else:
        # a restart shows the demo it already has instead of piling up one protocol per start
        headline = (
            f"Demo: protocol {run.protocol_name} from an earlier start ({run.status}) on {remote}; "
            f"delete {settings.data_dir} for a fresh one."
        )
    lines = [
        headline,
        f"  console:     http://127.0.0.1:{port}/console/protocols/{run.id}",
        f"  follow it:   http://127.0.0.1:{port}/api/protocols/{run.id}",
        f"  events:      http://127.0.0.1:{port}/api/events?protocol_run_id={run.id}",
        f"  the branch:  git --git-dir {remote} log --oneline {run.protocol_name}",
    ]
    message = "\n".join(lines)

    return message
