"""Long-lived clients shared by jobs and handlers, built once per worker process into ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from bot.core.errors import ConfigError
from bot.core.fsperm import ensure_private_dir, readable_by_others
from bot.core.settings import Settings
from bot.domain.secrets_scan import register_settings
from bot.forge.base import Forge, RepoRef
from bot.forge.github import GitHubForge
from bot.forge.gitlab import gitlab_forge
from bot.forge.local import LocalForge
from bot.git.cache import GitCache
from bot.storage.app_credentials import read_app_credentials
from bot.storage.db import Database
from bot.storage.models import Project
from bot.storage.secretbox import private_dir
from engines.registry import default_registry

log = logging.getLogger(__name__)
# how often a process re-reads the App credentials another process may have stored
APP_REFRESH_S = 60.0


class ForgeFactory:
    """The Forge for a project: Local, GitHub (per installation) or GitLab; clients are reused."""

    def __init__(
        self, settings: Settings, db: Database, overrides: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.overrides = overrides or {}  # tests inject forges by provider name
        self._cache: dict[str, Any] = {}
        # the App made through /github/setup, read from the database (sealed) at start-up
        self.stored_app: dict[str, Any] | None = None

        self._refresher: asyncio.Task[None] | None = None

    async def load_stored_app(self) -> None:
        """Read the App credentials every process shares (database first, the old file second)."""

        fresh = await read_app_credentials(self.settings, self.db)
        if fresh != self.stored_app:
            self.use_app(fresh)

    def watch_stored_app(self, every_s: float = APP_REFRESH_S) -> None:
        """Re-read the App now and then: a worker started before /github/setup picks it up."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(every_s)
                try:
                    await self.load_stored_app()
                except Exception as exc:  # a database hiccup: keep what we have, try again later
                    log.debug("could not re-read the GitHub App credentials: %s", exc)

        if self._refresher is None:
            self._refresher = asyncio.create_task(loop(), name="github-app-refresh")

    def use_app(self, credentials: dict[str, Any] | None) -> None:
        """A new App replaces the old one: drop clients built with the old key."""
        self.stored_app = credentials
        for key in [k for k in self._cache if k.startswith("github:")]:
            self._cache.pop(key)

    def repo_ref(self, project: Project) -> RepoRef:
        provider = project.provider if project.provider in ("github", "gitlab") else "local"
        full_name = project.name
        if provider == "local":
            full_name = project.git_url
        return RepoRef(
            provider,  # type: ignore[arg-type]
            full_name,
            installation_id=project.installation_id,
            forge_id=project.forge_id,
        )

    def forge_for(self, project: Project) -> Forge:
        if project.provider in self.overrides:
            forge: Forge = self.overrides[project.provider]
            return forge
        if project.provider == "github":
            key = f"github:{project.installation_id}"
            if key not in self._cache:
                pem = self.settings.github_private_key_pem()
                app_id: int | str | None = self.settings.github_app_id
                slug = self.settings.github_app_slug
                if not app_id or not pem:
                    # an App created through /github/setup: its credentials are in the database
                    stored = self.stored_app or {}
                    app_id, pem, slug = (
                        stored.get("id"),
                        stored.get("pem"),
                        slug or stored.get("slug"),
                    )
                if not app_id or not pem:
                    raise ConfigError(
                        "GitHub App not configured: set DEKSDENFLOW_GITHUB_APP_ID and a private key"
                    )
                self._cache[key] = GitHubForge.from_app(
                    app_id=app_id,
                    private_key=pem,
                    api_url=self.settings.github_api_url,
                    installation_id=project.installation_id,
                    app_slug=slug,
                    verify=self.settings.httpx_verify(),
                )
            forge = self._cache[key]
            return forge
        if project.provider == "gitlab":
            if "gitlab" not in self._cache:
                if self.settings.gitlab_token is None:
                    raise ConfigError("GitLab not configured: set DEKSDENFLOW_GITLAB_TOKEN")
                self._cache["gitlab"] = gitlab_forge(
                    self.settings.gitlab_url,
                    self.settings.gitlab_token.get_secret_value(),
                    ssl_verify=self.settings.tls_verify,
                )
            forge = self._cache["gitlab"]
            return forge

        return LocalForge(self.db, project.id)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for client in self._cache.values():
            closer = getattr(client, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        self._cache.clear()


async def build_services(ctx: dict[str, Any]) -> None:
    """Engines, the git cache and the forge factory; each only if not injected already."""

    settings: Settings = ctx["settings"]
    # every secret this worker holds, so pushes and published engine output are scanned for it
    register_settings(settings)
    # 0711 with a separate engine user: it may pass through to the worktrees and mirrors, and
    # list or read nothing else (the database and credentials stay 0600)
    ensure_private_dir(settings.data_dir, traversable=bool(settings.engine_user))
    key = settings.github_private_key_path
    if key is not None and readable_by_others(key):
        # not ours to chmod (an operator's or orchestrator's file), but worth a loud word
        log.warning("%s is readable by other users: make the App key 0600", key)
    if "engines" not in ctx:
        ctx["engines"] = default_registry(
            codex_bin=settings.codex_bin,
            codex_home=os.environ.get("CODEX_HOME"),
            scripted_script=settings.scripted_script,
            engine_user=settings.engine_user or None,
        )
    if "git" not in ctx:
        ctx["git"] = GitCache(
            settings.data_dir / "git",
            network_timeout=settings.git_timeout_s,
            warm_spares=settings.warm_worktrees,
            credential_hosts=settings.credential_hosts,
        )
    if "forges" not in ctx:
        private_dir(settings.data_dir)
        forges = ForgeFactory(settings, ctx["db"], ctx.get("forge_overrides"))
        await forges.load_stored_app()
        forges.watch_stored_app()
        ctx["forges"] = forges


async def close_services(ctx: dict[str, Any]) -> None:
    git = ctx.get("git")
    if git is not None and hasattr(git, "aclose"):
        await git.aclose()
    forges = ctx.get("forges")
    if isinstance(forges, ForgeFactory):
        await forges.aclose()
