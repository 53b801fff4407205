"""project_setup: learn a forge project's default branch, clone URL and CI provider."""

from __future__ import annotations

import logging
from typing import Any

from bot.core.errors import DeksdenFlowError, SpecError
from bot.forge.base import RepoFacts
from bot.jobs.common import count_job
from bot.storage.models import Project
from bot.storage.repo_config import CONFIG_FILE, refresh_repo_config
from bot.storage.runs import record_event

log = logging.getLogger(__name__)


async def project_setup(ctx: dict[str, Any], *, project_id: int) -> str:
    db = ctx["db"]
    async with db.sessions() as session:
        project = await session.get(Project, project_id)
    if project is None:
        return "missing"
    forge = ctx["forges"].forge_for(project)
    repo = ctx["forges"].repo_ref(project)
    values: dict[str, Any] = {}
    try:
        fallback = RepoFacts(project.base_branch, project.git_url, None, project.forge_id)
        facts = await forge.describe_repo(repo, fallback)
        if facts is None:
            return "local"
        values["base_branch"] = facts.base_branch
        values["git_url"] = facts.git_url
        if facts.forge_id is not None:
            values["forge_id"] = facts.forge_id
        values["ci_provider"] = facts.ci_provider
        project.base_branch = values.get("base_branch") or project.base_branch
        try:
            auth = await forge.git_auth_header(repo)
            mirror = await ctx["git"].ensure_mirror(values.get("git_url") or project.git_url, auth)
            await refresh_repo_config(db, project, mirror)
        except SpecError as exc:
            await record_event(db, "config.invalid", str(exc), project_id=project_id)
        except DeksdenFlowError as exc:  # the plan job reads it again from its fresh mirror
            await record_event(db, "config.unread", f"{CONFIG_FILE}: {exc}", project_id=project_id)
    except DeksdenFlowError as exc:
        log.warning("project setup for %s failed: %s", project.name, exc)
        await record_event(db, "project.setup_failed", str(exc), project_id=project_id)
        await count_job(ctx, "project_setup", "failed")
        return "failed"
    async with db.sessions.begin() as session:
        row = await session.get(Project, project_id)
        if row is not None:
            for key, value in values.items():
                setattr(row, key, value)
    await record_event(
        db,
        "project.setup",
        f"{project.name}: base {values.get('base_branch')}, CI {values.get('ci_provider')}",
        project_id=project_id,
        metadata={k: v for k, v in values.items() if k != "git_url"},
    )
    await count_job(ctx, "project_setup", "ok")
    return "ok"
