"""The doctor's forge checks: the GitHub App, the GitLab token and hooks, the public URL.

Each asks the real service with short timeouts and turns every answer into ✔/✘ lines with a fix;
the result types and the pure comparisons live in bot/domain/doctor_results.py and
bot/forge/github_permissions.py.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select

from bot.core.errors import DeksdenFlowError
from bot.core.settings import Settings
from bot.domain.doctor_results import (
    CONNECT_TIMEOUT_S,
    GITHUB_HOOK_PATH,
    GITLAB_HOOK_PATH,
    GITLAB_SCOPES,
    INSTANCE_HEADER,
    CheckResult,
    describe_error,
    fail,
    first_line,
    hook_points_at,
    instance_fingerprint,
    is_loopback_host,
    namespaces_of,
    ok,
    skip,
)
from bot.forge import github_permissions as ghp
from bot.forge.github_client import GitHubClient, GitHubHTTPError
from bot.forge.gitlab_client import GitLabAPIError, GitLabClient, project_path
from bot.storage.app_credentials import load_credentials, read_app_credentials
from bot.storage.db import database_from_settings
from bot.storage.models import Project


async def _stored_app(settings: Settings) -> dict[str, Any]:
    """The App /github/setup sealed in the database (or its older file); {} when none or
    unreadable."""

    try:
        db = database_from_settings(settings)
        try:
            return await read_app_credentials(settings, db) or {}
        finally:
            await db.dispose()
    except Exception:  # the database check reports an unreachable database on its own line
        return load_credentials(settings.data_dir) or {}


def _github_credentials(
    settings: Settings, stored: dict[str, Any] | None = None
) -> tuple[str | None, str | None, str | None, str | None]:
    """(app id, pem, webhook secret, slug) from the settings, else from what /github/setup
    stored."""
    app_id = str(settings.github_app_id) if settings.github_app_id else None
    pem = settings.github_private_key_pem()
    secret = (
        settings.github_webhook_secret.get_secret_value()
        if settings.github_webhook_secret
        else None
    )
    slug = settings.github_app_slug
    stored = stored or {}
    if not app_id or not pem:
        app_id = str(stored["id"]) if stored.get("id") else None
        pem = stored.get("pem")
        slug = slug or stored.get("slug")
    return app_id, pem, secret or stored.get("webhook_secret"), slug


async def check_github(
    settings: Settings, *, http: httpx.AsyncClient | None = None
) -> list[CheckResult]:
    try:
        app_id, pem, secret, _ = _github_credentials(settings, await _stored_app(settings))
    except OSError as exc:
        return [
            fail(
                "github app",
                f"cannot read the private key: {describe_error(exc)}",
                "point DEKSDENFLOW_GITHUB_PRIVATE_KEY_PATH at the App's .pem file",
            )
        ]
    if not app_id or not pem:
        return [skip("github app", "not configured (no DEKSDENFLOW_GITHUB_APP_ID / key)")]
    settings_url = f"{settings.github_web_url}/settings/apps"
    async with _app_client(settings, app_id, pem, http) as client:
        try:
            app = await client.request("GET", "/app", auth="app")
        except GitHubHTTPError as exc:
            return [_app_refused(exc, settings.github_api_url, settings_url)]
        except DeksdenFlowError as exc:
            return [_app_unreachable(exc, settings.github_api_url)]
        slug = str(app.get("slug") or app_id)
        results = [ok("github app", f"App {slug} (id {app.get('id', app_id)}) authenticated")]
        results.append(await _check_installations(client, app, settings.github_web_url, slug))
        results.append(_webhook_secret_result(secret))
        results.append(_permissions_result(ghp.load_manifest(), app, settings_url, slug))
        if settings.public_url:
            want = settings.public_url + GITHUB_HOOK_PATH
            results.append(await _check_webhook_url(client, want, settings_url, slug))
    return results


def _app_client(
    settings: Settings, app_id: str, pem: str, http: httpx.AsyncClient | None
) -> GitHubClient:
    """A client authenticating as the App, with one short attempt per request: the doctor
    reports a slow or failing GitHub instead of waiting it out."""
    return GitHubClient(
        app_id=app_id,
        private_key=pem,
        api_url=settings.github_api_url,
        http=http,
        max_attempts=1,
        timeout=CONNECT_TIMEOUT_S * 2,
        verify=settings.httpx_verify(),
    )


def _app_refused(exc: GitHubHTTPError, api_url: str, settings_url: str) -> CheckResult:
    """GET /app answered an error status: a 401 is a key of another App (or a wrong id)."""
    fix = (
        "DEKSDENFLOW_GITHUB_APP_ID and the private key must belong to the same App "
        f"(App id and 'Private keys' at {settings_url}/<slug>); generate a new key if lost"
        if exc.status_code == 401
        else f"check DEKSDENFLOW_GITHUB_API_URL ({api_url})"
    )
    return fail("github app", f"GET /app answered {exc.status_code}: {first_line(str(exc))}", fix)


def _app_unreachable(exc: DeksdenFlowError, api_url: str) -> CheckResult:
    """GET /app got no answer (or the key could not sign a token)."""
    return fail(
        "github app",
        describe_error(exc),
        f"check the private key and that {api_url} is reachable",
    )


async def _check_installations(
    client: GitHubClient, app: dict[str, Any], web_url: str, slug: str
) -> CheckResult:
    """How many accounts installed the App: GET /app's count, else the list of installations."""
    count = app.get("installations_count")
    if not isinstance(count, int):
        try:
            count = len(await client.get_all("/app/installations", auth="app"))
        except DeksdenFlowError as exc:
            return fail("github installations", describe_error(exc), "retry; check the App's key")
    return _installations_result(count, web_url, slug)


def _installations_result(count: int, web_url: str, slug: str) -> CheckResult:
    if count:
        return ok("github installations", f"installed on {count} account(s)")
    return fail(
        "github installations",
        "the App is installed nowhere: no repository can send events",
        f"install it: {web_url}/apps/{slug}/installations/new",
    )


def _webhook_secret_result(secret: str | None) -> CheckResult:
    if secret:
        return ok("github webhook secret", "set")
    return fail(
        "github webhook secret",
        "unset: /webhooks/github answers 503 to every delivery",
        "set DEKSDENFLOW_GITHUB_WEBHOOK_SECRET (or _FILE) to the App's webhook secret",
    )


def _permissions_result(
    manifest: dict[str, Any], app: dict[str, Any], settings_url: str, slug: str
) -> CheckResult:
    """The App's granted permissions and events against what app.yml (the manifest) asks."""
    lacking = ghp.missing_permissions(
        dict(manifest.get("default_permissions") or {}), app.get("permissions") or {}
    )
    events = ghp.missing_events(manifest.get("default_events") or [], app.get("events") or [])
    if not lacking and not events:
        return ok("github permissions", "permissions and events cover app.yml")
    wanted = [f"{k}: {v}" for k, v in lacking.items()] + [f"event {e}" for e in events]
    return fail(
        "github permissions",
        "the App lacks " + ", ".join(wanted),
        f"grant them at {settings_url}/{slug}/permissions, then accept the new "
        "permissions on each installation",
    )


async def _check_webhook_url(
    client: GitHubClient, want: str, settings_url: str, slug: str
) -> CheckResult:
    """Where the App delivers its webhooks, against our public URL's hook path."""
    try:
        hook = await client.request("GET", "/app/hook/config", auth="app")
    except DeksdenFlowError as exc:
        return fail("github webhook url", describe_error(exc), "retry later")
    got = str((hook or {}).get("url") or "")
    if got.rstrip("/") == want:
        return ok("github webhook url", want)
    return fail(
        "github webhook url",
        f"the App delivers to {got or 'nowhere'}, not {want}",
        f"set the Webhook URL at {settings_url}/{slug} to {want}",
    )


async def _gitlab_projects(settings: Settings) -> list[tuple[str, str | None]]:
    """(name, forge id) of the enabled GitLab projects in our database; none if it is absent."""
    if settings.database_url.startswith("sqlite") and not settings.sqlite_path.exists():
        return []
    db = database_from_settings(settings)
    try:
        async with db.sessions() as session:
            rows = await session.execute(
                select(Project.name, Project.forge_id).where(
                    Project.provider == "gitlab", Project.enabled.is_(True)
                )
            )
            return [(str(name), forge_id) for name, forge_id in rows.all()]
    finally:
        await db.dispose()


async def check_gitlab(settings: Settings) -> list[CheckResult]:
    if settings.gitlab_token is None or not settings.gitlab_token.get_secret_value():
        return [skip("gitlab token", "not configured (no DEKSDENFLOW_GITLAB_TOKEN)")]
    tokens_page = f"{settings.gitlab_url}/-/user_settings/personal_access_tokens"
    client = GitLabClient(
        settings.gitlab_url,
        settings.gitlab_token.get_secret_value(),
        timeout=CONNECT_TIMEOUT_S * 2,
        max_retries=0,
        ssl_verify=settings.tls_verify,
    )
    try:
        try:
            token = await client.get("/personal_access_tokens/self")
        except GitLabAPIError as exc:
            return [await _gitlab_token_refused(client, settings, exc, tokens_page)]
        results = [_gitlab_token_scopes(token, tokens_page)]
        results += await _gitlab_hooks(client, settings)
    finally:
        await client.aclose()
    return results


async def _gitlab_token_refused(
    client: GitLabClient, settings: Settings, exc: GitLabAPIError, tokens_page: str
) -> CheckResult:
    """The token check when GitLab would not show the token itself."""
    if exc.status_code == 401:
        return fail(
            "gitlab token",
            f"{settings.gitlab_url} rejected DEKSDENFLOW_GITLAB_TOKEN (401): "
            "wrong, expired or revoked",
            f"create a token with the api scope ({tokens_page}, or a project/group "
            "access token, role Developer or higher) and set DEKSDENFLOW_GITLAB_TOKEN",
        )
    if exc.status_code == 404:
        # GitLab before 15.5 has no /personal_access_tokens/self: the token is still
        # usable if /user answers, only its scopes cannot be listed
        try:
            user = await client.get("/user")
        except GitLabAPIError:
            user = None
        if user:
            return ok(
                "gitlab token",
                f"valid (user {user.get('username')}); this GitLab "
                "cannot list a token's scopes: make sure it has api",
            )
    if exc.status_code is None:
        return fail(
            "gitlab token",
            f"cannot reach {settings.gitlab_url}: {exc.message}",
            "check DEKSDENFLOW_GITLAB_URL (and DEKSDENFLOW_CA_BUNDLE for a private CA)",
        )
    return fail(
        "gitlab token",
        first_line(str(exc)),
        "check DEKSDENFLOW_GITLAB_URL: the GitLab base URL, without /api/v4",
    )


def _gitlab_token_scopes(token: Any, tokens_page: str) -> CheckResult:
    """The token check from what GitLab says of the token: active, with the scopes we need."""
    scopes = [str(s) for s in (token or {}).get("scopes") or []]
    missing = [s for s in GITLAB_SCOPES if s not in scopes]
    if missing or (token or {}).get("active") is False:
        return fail(
            "gitlab token",
            f"token {token.get('name')!r} has scopes {', '.join(scopes) or 'none'}; "
            f"needs {', '.join(GITLAB_SCOPES)}",
            f"create a token with the api scope ({tokens_page}) and set DEKSDENFLOW_GITLAB_TOKEN",
        )
    expires = token.get("expires_at")
    return ok(
        "gitlab token",
        f"token {token.get('name')!r} valid, scopes {', '.join(scopes)}"
        + (f", expires {expires}" if expires else ""),
    )


async def _gitlab_hooks(client: GitLabClient, settings: Settings) -> list[CheckResult]:
    """One line per registered GitLab project: does a project or group hook deliver to us."""
    try:
        projects = await _gitlab_projects(settings)
    except Exception as exc:
        return [skip("gitlab hooks", f"cannot read the registered projects: {describe_error(exc)}")]
    if not projects:
        return [skip("gitlab hooks", "no GitLab project registered (`deksdenflow gitlab add`)")]
    if not settings.public_url:
        return [
            skip("gitlab hooks", "DEKSDENFLOW_PUBLIC_URL unset: cannot tell the right hook URL")
        ]
    want = settings.public_url + GITLAB_HOOK_PATH
    return [await _gitlab_hook(client, name, forge_id, want) for name, forge_id in projects]


async def _gitlab_hook(
    client: GitLabClient, name: str, forge_id: str | None, want: str
) -> CheckResult:
    """Whether the project `name`, or a group above it, has a hook delivering to `want`."""
    ref: str | int = int(forge_id) if forge_id and forge_id.isdigit() else name
    try:
        hooks = await client.get(f"/projects/{project_path(ref)}/hooks", {"per_page": 100})
    except GitLabAPIError as exc:
        return fail(
            f"gitlab hook {name}",
            f"cannot list its hooks: {first_line(str(exc))}",
            "the token needs Maintainer on the project to see its hooks",
        )
    served = hook_points_at(hooks or [], want)
    if not served:
        for group in namespaces_of(name):
            try:
                group_hooks = await client.get(f"/groups/{project_path(group)}/hooks")
            except GitLabAPIError:
                continue  # not a group, or no Owner access: only project hooks count
            if hook_points_at(group_hooks or [], want):
                served = True
                break
    if served:
        return ok(f"gitlab hook {name}", f"delivers to {want}")
    urls = ", ".join(str(h.get("url")) for h in hooks or []) or "none"
    return fail(
        f"gitlab hook {name}",
        f"no hook delivers to {want} (hooks: {urls})",
        f"deksdenflow gitlab add {name} --create-hook --hook-url {want}",
    )


def _forges_configured(settings: Settings) -> bool:
    return (
        bool(settings.github_app_id or settings.gitlab_token)
        or (settings.data_dir / "github-app.json").exists()
    )


async def check_public_url(
    settings: Settings, *, http: httpx.AsyncClient | None = None, cheap: bool = False
) -> CheckResult:
    name = "public url"
    if not settings.public_url:
        if not _forges_configured(settings):
            return skip(name, "DEKSDENFLOW_PUBLIC_URL unset (not needed without a forge)")
        return fail(
            name,
            "DEKSDENFLOW_PUBLIC_URL is unset: the forges need an address to deliver to",
            "set it to the https:// address that reaches this server (a tunnel for local "
            "development: smee.io, `gh webhook forward`, ngrok, cloudflared)",
        )
    host = urlsplit(settings.public_url).hostname
    if is_loopback_host(host):
        return fail(
            name,
            f"{settings.public_url} is a loopback address: GitHub and GitLab cannot reach it",
            "use a public address or a tunnel (smee.io, `gh webhook forward`, ngrok)",
        )
    if cheap:
        return ok(name, f"{settings.public_url} (not fetched at start)")
    url = settings.public_url + "/healthz"
    own = http is None
    client = http or httpx.AsyncClient(
        timeout=CONNECT_TIMEOUT_S * 2, verify=settings.httpx_verify()
    )
    try:
        response = await client.get(url, timeout=CONNECT_TIMEOUT_S * 2)
    except httpx.HTTPError as exc:
        return fail(
            name,
            f"GET {url} failed: {describe_error(exc)}",
            "start `serve`, and check DNS, the proxy or tunnel in front of it",
        )
    finally:
        if own:
            await client.aclose()
    if response.status_code != 200:
        return fail(
            name,
            f"GET {url} answered {response.status_code}",
            "route the public URL to this server's port",
        )
    theirs = response.headers.get(INSTANCE_HEADER)
    if theirs is None:
        return fail(
            name,
            f"{url} answers, but not as DeksdenFlow",
            "route the public URL to this server's port",
        )
    mine = instance_fingerprint(settings)
    if mine is not None and theirs != mine:
        return fail(
            name,
            f"{url} is another DeksdenFlow instance (different webhook secrets)",
            "point the public URL at this instance, or give both the same secrets",
        )
    return ok(name, f"{url} serves this instance")
