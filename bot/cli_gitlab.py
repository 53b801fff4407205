"""`deksdenflow gitlab add`: register a GitLab project, and optionally create its webhook."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sqlalchemy import update

from bot.errors import ConfigError
from bot.settings import Settings

HOOK_PATH = "/webhooks/gitlab"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gitlab = sub.add_parser("gitlab", help="manage GitLab projects")
    gsub = gitlab.add_subparsers(dest="gitlab_command", required=True, metavar="ACTION")
    add = gsub.add_parser(
        "add",
        help="register a project (path like group/name, or numeric id) from DEKSDENFLOW_GITLAB_URL",
    )
    add.add_argument("project", help="project path (group/sub/name) or numeric id")
    add.add_argument(
        "--hook-url",
        help=f"public URL of this server's GitLab webhook, e.g. https://bot.example.com{HOOK_PATH}",
    )
    add.add_argument(
        "--create-hook",
        action="store_true",
        help="create (or update) the project hook: note, issue, merge request and pipeline events",
    )
    add.set_defaults(handler=_cmd_add)


def _cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(
        add_project(settings, args.project, hook_url=args.hook_url, create_hook=args.create_hook)
    )


def _project_ref(raw: str) -> str | int:
    raw = raw.strip().strip("/")
    return int(raw) if raw.isdigit() else raw


async def add_project(
    settings: Settings, project: str, *, hook_url: str | None = None, create_hook: bool = False
) -> int:
    """Fetch the project from GitLab, store it, and create its hook when asked."""
    from bot.db import database_from_settings
    from bot.forge.gitlab import gitlab_forge
    from bot.migrate import upgrade_head
    from bot.models import Project
    from bot.runs import get_or_create_project

    if settings.gitlab_token is None:
        raise ConfigError("GitLab not configured: set DEKSDENFLOW_GITLAB_TOKEN")
    secret = (
        settings.gitlab_webhook_secret.get_secret_value() if settings.gitlab_webhook_secret else ""
    )
    if create_hook:
        # checked before any call: a half-done registration is worse than none
        if not hook_url:
            raise ConfigError(
                "--create-hook needs --hook-url (this server's public /webhooks/gitlab URL)"
            )
        if not secret:
            raise ConfigError(
                "--create-hook needs DEKSDENFLOW_GITLAB_WEBHOOK_SECRET: the hook sends it"
            )
    forge = gitlab_forge(
        settings.gitlab_url,
        settings.gitlab_token.get_secret_value(),
        ssl_verify=settings.tls_verify,
    )
    try:
        info = await forge.get_project(_project_ref(project))
        forge_id = str(info["id"])
        base = str(info.get("default_branch") or "main")
        has_ci = await forge.has_file(int(forge_id), base, ".gitlab-ci.yml")
        values: dict[str, Any] = {
            "git_url": str(info["http_url_to_repo"]),
            "base_branch": base,
            "forge_id": forge_id,
            "ci_provider": "gitlab-ci" if has_ci else None,
        }
        hook: dict[str, Any] | None = None
        if create_hook:
            assert hook_url is not None
            hook = await forge.create_project_hook(int(forge_id), hook_url, secret)
    finally:
        await forge.client.aclose()

    if settings.database_url.startswith("sqlite"):
        await asyncio.to_thread(upgrade_head, settings.database_url)
    db = database_from_settings(settings)
    try:
        stored = await get_or_create_project(
            db, name=str(info["path_with_namespace"]), provider="gitlab", **values
        )
        if stored.provider != "gitlab":
            raise ConfigError(
                f"a {stored.provider} project named {stored.name} is already registered"
            )
        # adding again refreshes what GitLab says (renamed default branch, new CI file, …)
        async with db.sessions.begin() as session:
            await session.execute(
                update(Project).where(Project.id == stored.id).values(enabled=True, **values)
            )
    finally:
        await db.dispose()
    ci = values["ci_provider"] or "no .gitlab-ci.yml"
    print(
        f"registered GitLab project {info['path_with_namespace']} (id {forge_id}, base {base}, CI: {ci})"
    )
    if hook is not None:
        print(
            f"project hook {hook.get('id')} → {hook_url} (note, issue, merge request and pipeline events)"
        )
    elif not create_hook:
        print(
            f"no webhook created: pass --create-hook --hook-url https://<this server>{HOOK_PATH}, "
            "or add it in GitLab with the secret token DEKSDENFLOW_GITLAB_WEBHOOK_SECRET",
            file=sys.stderr,
        )
    return 0
