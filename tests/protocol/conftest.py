"""Protocol-engine fixtures: a bare origin with one commit on main, and an in-process runtime."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.core.settings import Settings
from bot.jobs.actions import start_protocol
from bot.jobs.local_runtime import drain, local_runtime
from bot.storage.models import Event, Project
from bot.storage.runs import get_or_create_project, load_run
from engines.registry import EngineRegistry
from engines.scripted import ScriptedEngine
from tests.conftest import make_settings
from tests.fakes.codex_fixtures import codex_bin, fake_codex, fake_model
from tests.gitutil import git, make_origin

__all__ = ["codex_bin", "fake_codex", "fake_model"]


def commit_to_origin(origin: Path, branch: str, files: Mapping[str, str], message: str) -> None:
    """Commit `files` on `branch` of the bare `origin` through a scratch clone."""
    scratch = origin.parent / f"scratch-{abs(hash((branch, message)))}"
    if not scratch.exists():
        git("clone", "-q", str(origin), str(scratch), cwd=origin.parent)
    git("fetch", "-q", "origin", cwd=scratch)
    remote_branches = git("branch", "-r", cwd=scratch)
    if f"origin/{branch}" in remote_branches:
        git("checkout", "-q", "-B", branch, f"origin/{branch}", cwd=scratch)
    else:
        git("checkout", "-q", "-B", branch, cwd=scratch)
    for rel, content in files.items():
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git("add", "--all", cwd=scratch)
    git("commit", "-q", "-m", message, cwd=scratch)
    git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=scratch)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare repository with one commit (README.md) on main: the 'remote' of every test."""
    return make_origin(tmp_path, readme="# demo\n")


def origin_log(origin: Path, branch: str) -> list[str]:
    """Subjects on `branch` of the origin, oldest first."""
    out = git("log", "--reverse", "--format=%s", branch, cwd=origin)
    return out.splitlines()


def origin_file(origin: Path, branch: str, path: str) -> str:
    return git("show", f"{branch}:{path}", cwd=origin)


def origin_files(origin: Path, branch: str, under: str) -> list[str]:
    out = git("ls-tree", "-r", "--name-only", branch, "--", under, cwd=origin)
    return out.splitlines()


def origin_branches(origin: Path) -> list[str]:
    return git("for-each-ref", "--format=%(refname:short)", "refs/heads/", cwd=origin).split()


def protocol_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"db_url": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    values.update(overrides)
    return make_settings(tmp_path, **values)


def quiet(_line: str) -> None:
    return None


class Harness:
    """A local runtime plus the origin's project, with helpers the tests share."""

    def __init__(self, ctx: dict[str, Any], project: Project, origin: Path) -> None:
        self.ctx = ctx
        self.project = project
        self.origin = origin

    def use(self, *engines: Any) -> None:
        self.ctx["engines"] = EngineRegistry(list(engines))

    async def start(self, task: str = "Add a greeting", **kw: Any) -> int:
        kw.setdefault("approved", True)
        run = await start_protocol(self.ctx, self.project, task, **kw)
        await drain(self.ctx, self.project.id, printer=quiet)
        return run.id

    async def drain(self) -> None:
        await drain(self.ctx, self.project.id, printer=quiet)

    async def state(self, run_id: int) -> Any:
        return await load_run(self.ctx["db"], run_id)

    async def events(self, run_id: int, prefix: str = "") -> list[Event]:
        async with self.ctx["db"].sessions() as session:
            rows = (
                await session.execute(
                    select(Event).where(Event.protocol_run_id == run_id).order_by(Event.id)
                )
            ).scalars()
            return [e for e in rows if e.event_type.startswith(prefix)]

    async def event_types(self, run_id: int) -> list[str]:
        return [e.event_type for e in await self.events(run_id)]


@contextlib.asynccontextmanager
async def make_harness(settings: Settings, origin: Path) -> AsyncIterator[Harness]:
    async with local_runtime(settings) as ctx:
        project = await get_or_create_project(
            ctx["db"],
            name=f"local:{origin}",
            provider="local",
            git_url=str(origin),
            base_branch="main",
        )
        yield Harness(ctx, project, origin)


@pytest.fixture
async def harness(tmp_path: Path, origin: Path) -> AsyncIterator[Harness]:
    """A runtime with the default scripted engine (a fresh ScriptedEngine per test)."""
    async with make_harness(protocol_settings(tmp_path), origin) as h:
        h.use(ScriptedEngine())
        yield h


def scripted_script(**sections: Any) -> dict[str, Any]:
    """The default scripted YAML with some top-level sections replaced."""
    import yaml

    from engines.scripted import DEFAULT_SCRIPT_PATH

    script: dict[str, Any] = yaml.safe_load(DEFAULT_SCRIPT_PATH.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(script.get(key), dict):
            script[key] = {**script[key], **value}
        else:
            script[key] = value
    return script


def one_step_planning(**step: Any) -> dict[str, Any]:
    """A planning section with a single step (slug add-greeting)."""
    entry = {
        "slug": "add-greeting",
        "title": "Add a greeting module",
        "content": "# Add a greeting module\n",
        "commit_type": "feat",
        "qa_policy": "full",
        **step,
    }
    return {"steps": [entry]}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
