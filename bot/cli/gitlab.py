"""`deksdenflow gitlab add`: register a GitLab project, and optionally create its webhook."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.forge.gitlab import gitlab_forge
from bot.storage.db import database_from_settings
from bot.storage.migrate import upgrade_head
from bot.storage.runs import register_project

if TYPE_CHECKING:
    from bot.forge.gitlab import GitLabForge

HOOK_PATH = "/webhooks/gitlab"
HOOK_EVENTS = "note, issue, confidential note and issue, merge request and pipeline events"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gitlab = sub.add_parser("gitlab", help="manage GitLab projects")
    gsub = gitlab.add_subparsers(dest="gitlab_command", required=True, metavar="ACTION")
    add = gsub.add_parser(
        "add",
        help="register a project (path like group/name, or numeric id) from DEKSDENFLOW_GITLAB_URL",
    )
    add.add_argument("project", help="project path (group/sub/name) or numeric id")
    add.add_argument(
        "--group",
        action="store_true",
        help="PROJECT is a group: register all its projects, and put the hook on the group",
    )
    add.add_argument(
        "--hook-url",
        help=f"public URL of this server's GitLab webhook, e.g. https://bot.example.com{HOOK_PATH}",
    )
    add.add_argument(
        "--create-hook",
        action="store_true",
        help=f"create (or update) the project (or group) hook: {HOOK_EVENTS}",
    )
    add.set_defaults(handler=_cmd_add)


def _cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    add = add_group if args.group else add_project
    return asyncio.run(
        add(settings, args.project, hook_url=args.hook_url, create_hook=args.create_hook)
    )


def _project_ref(raw: str) -> str | int:
    raw = raw.strip().strip("/")
    return int(raw) if raw.isdigit() else raw


def _hook_secret(settings: Settings, *, hook_url: str | None, create_hook: bool) -> str:
    """The webhook secret; with --create-hook, checked before any call (half-done is worse)."""
    if settings.gitlab_token is None:
        raise ConfigError("GitLab not configured: set DEKSDENFLOW_GITLAB_TOKEN")
    secret = (
        settings.gitlab_webhook_secret.get_secret_value() if settings.gitlab_webhook_secret else ""
    )
    if create_hook:
        if not hook_url:
            raise ConfigError(
                "--create-hook needs --hook-url (this server's public /webhooks/gitlab URL)"
            )
        if not secret:
            raise ConfigError(
                "--create-hook needs DEKSDENFLOW_GITLAB_WEBHOOK_SECRET: the hook sends it"
            )
    return secret


def _forge(settings: Settings) -> GitLabForge:
    assert settings.gitlab_token is not None
    return gitlab_forge(
        settings.gitlab_url,
        settings.gitlab_token.get_secret_value(),
        ssl_verify=settings.tls_verify,
    )


async def _values(forge: GitLabForge, info: dict[str, Any]) -> dict[str, Any]:
    forge_id = str(info["id"])
    base = str(info.get("default_branch") or "main")
    has_ci = await forge.has_file(int(forge_id), base, ".gitlab-ci.yml")
    return {
        "git_url": str(info["http_url_to_repo"]),
        "base_branch": base,
        "forge_id": forge_id,
        "ci_provider": "gitlab-ci" if has_ci else None,
    }


async def _store(settings: Settings, projects: list[tuple[str, dict[str, Any]]]) -> None:
    if settings.database_url.startswith("sqlite"):
        await asyncio.to_thread(upgrade_head, settings.database_url)
    db = database_from_settings(settings)
    try:
        for name, values in projects:
            # adding again refreshes what GitLab says (renamed default branch, new CI file, …)
            await register_project(db, name=name, provider="gitlab", **values)
    finally:
        await db.dispose()


def _describe(name: str, values: dict[str, Any]) -> str:
    ci = values["ci_provider"] or "no .gitlab-ci.yml"
    return (
        f"registered GitLab project {name} "
        f"(id {values['forge_id']}, base {values['base_branch']}, CI: {ci})"
    )


async def add_project(
    settings: Settings, project: str, *, hook_url: str | None = None, create_hook: bool = False
) -> int:
    """Fetch the project from GitLab, store it, and create its hook when asked."""
    secret = _hook_secret(settings, hook_url=hook_url, create_hook=create_hook)
    forge = _forge(settings)
    try:
        info = await forge.get_project(_project_ref(project))
        values = await _values(forge, info)
        hook: dict[str, Any] | None = None
        if create_hook:
            assert hook_url is not None
            hook = await forge.create_project_hook(int(values["forge_id"]), hook_url, secret)
    finally:
        await forge.client.aclose()

    name = str(info["path_with_namespace"])
    await _store(settings, [(name, values)])
    print(_describe(name, values))
    if hook is not None:
        print(f"project hook {hook.get('id')} → {hook_url} ({HOOK_EVENTS})")
    elif not create_hook:
        print(
            f"no webhook created: pass --create-hook --hook-url https://<this server>{HOOK_PATH}, "
            "or add it in GitLab with the secret token DEKSDENFLOW_GITLAB_WEBHOOK_SECRET",
            file=sys.stderr,
        )
    return 0


async def add_group(
    settings: Settings, group: str, *, hook_url: str | None = None, create_hook: bool = False
) -> int:
    """Register every project of a group (and its subgroups); one group hook serves them all.

    Projects created in the group later send events through the same hook, but are only
    served once registered: run `gitlab add --group` again (it is idempotent).
    """
    secret = _hook_secret(settings, hook_url=hook_url, create_hook=create_hook)
    forge = _forge(settings)
    try:
        info = await forge.get_group(_project_ref(group))
        found = await forge.group_projects(int(info["id"]))
        projects = [(str(p["path_with_namespace"]), await _values(forge, p)) for p in found]
        hook: dict[str, Any] | None = None
        if create_hook:
            assert hook_url is not None
            hook = await forge.create_group_hook(int(info["id"]), hook_url, secret)
    finally:
        await forge.client.aclose()

    await _store(settings, projects)
    for name, values in projects:
        print(_describe(name, values))
    if not projects:
        print(f"group {info.get('full_path')} has no projects yet", file=sys.stderr)
    if hook is not None:
        print(
            f"group hook {hook.get('id')} on {info.get('full_path')} → {hook_url} ({HOOK_EVENTS})"
        )
    elif not create_hook:
        print(
            f"no webhook created: pass --create-hook --hook-url https://<this server>{HOOK_PATH} "
            "(group hooks need GitLab Premium; otherwise add project hooks)",
            file=sys.stderr,
        )
    return 0
