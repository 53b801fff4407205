"""A project with one protocol run in a database, for tests of what the storage layer keeps."""

from __future__ import annotations

from bot.storage.db import Database
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import create_run, get_or_create_project


async def project_and_run(db: Database) -> tuple[Project, ProtocolRun]:
    project = await get_or_create_project(
        db, name="p", provider="local", git_url="/x", base_branch="main"
    )
    run = await create_run(
        db, project=project, protocol_name="0001-x", description="x", base_branch="main"
    )
    return project, run
