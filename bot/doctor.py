"""`deksdenflow doctor`: is this install able to work? One ✔/✘ line per check, a fix for each ✘.

Result types and the comparisons are pure; each check is a small async function doing its own
I/O with a short timeout, so one unreachable system costs seconds, not the whole run.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from bot.errors import ConfigError, DeksdenFlowError
from bot.forge import github_permissions as ghp
from bot.settings import Settings

Status = Literal["ok", "fail", "skip"]
MARKS: dict[Status, str] = {"ok": "✔", "fail": "✘", "skip": "–"}
INSTANCE_HEADER = "X-DeksdenFlow-Instance"
GITLAB_HOOK_PATH = "/webhooks/gitlab"
GITHUB_HOOK_PATH = "/webhooks/github"
GITLAB_SCOPES = ("api",)  # `api` includes write_repository (git push over HTTPS)
CONNECT_TIMEOUT_S = 5.0
MODEL_CALL_TIMEOUT_S = 120.0
CODEX_INSTALL = "npm install -g @openai/codex@0.169.0 (or `make codex` in a checkout)"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "fail", detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "skip", detail)


# --- rendering (pure) ---------------------------------------------------------------------------


def render_line(result: CheckResult) -> str:
    line = f"{MARKS[result.status]} {result.name}: {result.detail}"
    if result.fix:
        line += f"\n    fix: {result.fix}"
    return line


def render(results: Iterable[CheckResult]) -> str:
    results = list(results)
    failed = sum(r.failed for r in results)
    summary = f"{failed} check(s) failed" if failed else "all checks passed"
    return "\n".join([*(render_line(r) for r in results), summary])


def to_json(results: Iterable[CheckResult]) -> str:
    items = list(results)
    return json.dumps(
        {"ok": not any(r.failed for r in items), "checks": [asdict(r) for r in items]},
        ensure_ascii=False,
        indent=2,
    )


def exit_code(results: Iterable[CheckResult]) -> int:
    return 1 if any(r.failed for r in results) else 0


def config_error_result(exc: ConfigError) -> CheckResult:
    return fail(
        "settings",
        str(exc),
        "correct that variable (see the README's configuration table), then run doctor again",
    )


# --- small pure helpers -------------------------------------------------------------------------


def safe_url(url: str) -> str:
    """A URL fit for a report: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def first_line(text: str, limit: int = 200) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _error(exc: BaseException) -> str:
    text = first_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def instance_fingerprint(settings: Settings) -> str | None:
    """An id that two processes with the same webhook secrets share; reveals nothing of them.

    `/healthz` sends it in a header, so the doctor can tell "our instance answers at
    PUBLIC_URL" from "some server answers there".
    """
    secrets = [
        s.get_secret_value()
        for s in (settings.github_webhook_secret, settings.gitlab_webhook_secret)
        if s is not None and s.get_secret_value()
    ]
    if not secrets:
        return None
    key = "\0".join(secrets).encode()
    return hmac.new(key, b"deksdenflow-instance", hashlib.sha256).hexdigest()[:16]


def is_loopback_host(host: str | None) -> bool:
    host = (host or "").strip("[]").lower()
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.") or host.endswith(
        ".localhost"
    )


def hook_points_at(hooks: Iterable[Mapping[str, Any]], url: str) -> bool:
    want = url.rstrip("/")
    return any(str(h.get("url") or "").rstrip("/") == want for h in hooks)


def namespaces_of(path_with_namespace: str) -> list[str]:
    """`a/b/c` → [`a/b`, `a`]: the groups whose hooks may serve project c."""
    parts = path_with_namespace.strip("/").split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


# --- checks -------------------------------------------------------------------------------------


def _database_state(url: str) -> tuple[set[str], set[str]]:
    """(current revisions, head revisions): runs in a thread, the engine is sync."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from bot.migrate import alembic_config

    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = int(CONNECT_TIMEOUT_S)
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    return current, heads


async def check_database(settings: Settings) -> CheckResult:
    name = "database"
    url = settings.database_url
    shown = safe_url(url)
    sqlite = url.startswith("sqlite")
    if sqlite and not settings.sqlite_path.exists():
        return ok(name, f"SQLite {settings.sqlite_path} will be created and migrated by `serve`")
    try:
        current, heads = await asyncio.wait_for(
            asyncio.to_thread(_database_state, url), CONNECT_TIMEOUT_S * 2
        )
    except TimeoutError:
        return fail(
            name,
            f"{shown} did not answer within {CONNECT_TIMEOUT_S * 2:.0f} s",
            "start the database, or correct DEKSDENFLOW_DB_URL (host, port)",
        )
    except Exception as exc:
        return fail(
            name,
            f"cannot connect to {shown}: {_error(exc)}",
            "start the database, or correct DEKSDENFLOW_DB_URL (host, port, user, password)",
        )
    if current == heads:
        return ok(name, f"{shown} reachable, migrations at head ({', '.join(sorted(heads))})")
    where = ", ".join(sorted(current)) or "empty"
    if sqlite:
        return ok(name, f"{shown} at {where}; `serve` migrates SQLite to head at start")
    return fail(
        name,
        f"{shown} is at {where}, not at head ({', '.join(sorted(heads))})",
        "run `deksdenflow migrate` (compose: the `migrate` service)",
    )


async def check_queue(settings: Settings) -> CheckResult:
    name = "queue"
    if settings.memory_queue:
        return ok(name, "embedded in-process queue (memory://): `serve` runs its own worker")
    from redis.asyncio import Redis

    shown = safe_url(settings.redis_url)
    client = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=CONNECT_TIMEOUT_S,
    )
    try:
        await asyncio.wait_for(client.ping(), CONNECT_TIMEOUT_S * 2)
    except Exception as exc:
        return fail(
            name,
            f"Redis at {shown} unreachable: {_error(exc)}",
            "start Redis there, or correct DEKSDENFLOW_REDIS_URL "
            "(memory:// runs a single process without Redis)",
        )
    finally:
        await client.aclose()
    return ok(name, f"Redis at {shown} answers")


async def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    """(exit code, stdout — or stderr when the command failed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "timed out"
    code = proc.returncode if proc.returncode is not None else -1
    # codex prints warnings (about CODEX_HOME, PATH aliases…) on stderr even when it works
    return code, (out if code == 0 else err or out).decode(errors="replace")


async def check_engine(settings: Settings, *, offline: bool, cheap: bool = False) -> list[CheckResult]:
    if settings.engine != "codex":
        return [ok("engine", f"{settings.engine} engine (offline, no model call)")]
    found = shutil.which(settings.codex_bin)
    if found is None:
        return [
            fail(
                "engine",
                f"codex CLI not found: {settings.codex_bin!r} is not an executable on PATH",
                f"{CODEX_INSTALL}, or set DEKSDENFLOW_CODEX_BIN to the binary",
            )
        ]
    code, out = await _run([found, "--version"], 20)
    if code != 0:
        return [
            fail(
                "engine",
                f"{found} --version failed (exit {code}): {first_line(out)}",
                f"reinstall the Codex CLI: {CODEX_INSTALL}",
            )
        ]
    results = [ok("engine", f"{first_line(out)} at {found}")]
    if cheap:
        return results
    if offline:
        results.append(skip("model call", "skipped (--offline)"))
    else:
        results.append(await check_model_call(settings, found))
    return results


async def check_model_call(settings: Settings, codex_bin: str) -> CheckResult:
    """One tiny read-only turn through the same engine class the worker uses."""
    from bot.spec import BUILTIN_MODEL
    from engines.base import EngineRequest
    from engines.codex import CodexEngine

    name = "model call"
    model = settings.protocol_exec_model or BUILTIN_MODEL
    engine = CodexEngine(codex_bin, codex_home=os.environ.get("CODEX_HOME"))
    with tempfile.TemporaryDirectory(prefix="deksdenflow-doctor-") as tmp:
        code, out = await _run(["git", "init", "-q", tmp], 20)
        if code != 0:
            return fail(name, f"git init failed: {first_line(out)}", "install git")
        request = EngineRequest(
            prompt="Reply with the single word OK. Do not run any command.",
            workdir=Path(tmp),
            phase="execute",
            model=model,
            sandbox="read-only",
            timeout_s=MODEL_CALL_TIMEOUT_S,
        )
        try:
            result = await engine.run(request)
        except DeksdenFlowError as exc:
            result = None
            error = _error(exc)
    if result is not None and result.ok:
        return ok(name, f"model {model} answered ({result.usage.total} tokens)")
    if result is not None:
        error = first_line(result.error or result.final_message or result.outcome)
    return fail(
        name,
        f"model {model} did not answer: {error}",
        "set CODEX_API_KEY (or CODEX_API_KEY_FILE), or configure the provider in "
        "$CODEX_HOME/config.toml; run doctor --offline to skip this check",
    )


def _github_credentials(settings: Settings) -> tuple[str | None, str | None, str | None, str | None]:
    """(app id, pem, webhook secret, slug) from the settings, else from /github/setup's file."""
    from bot.github_setup import load_credentials

    app_id = str(settings.github_app_id) if settings.github_app_id else None
    pem = settings.github_private_key_pem()
    secret = (
        settings.github_webhook_secret.get_secret_value() if settings.github_webhook_secret else None
    )
    slug = settings.github_app_slug
    stored = load_credentials(settings.data_dir) or {}
    if not app_id or not pem:
        app_id = str(stored["id"]) if stored.get("id") else None
        pem = stored.get("pem")
        slug = slug or stored.get("slug")
    return app_id, pem, secret or stored.get("webhook_secret"), slug


async def check_github(settings: Settings, *, http: httpx.AsyncClient | None = None) -> list[CheckResult]:
    from bot.forge.github_client import GitHubClient, GitHubHTTPError

    try:
        app_id, pem, secret, _ = _github_credentials(settings)
    except OSError as exc:
        return [fail("github app", f"cannot read the private key: {_error(exc)}",
                     "point DEKSDENFLOW_GITHUB_PRIVATE_KEY_PATH at the App's .pem file")]
    if not app_id or not pem:
        return [skip("github app", "not configured (no DEKSDENFLOW_GITHUB_APP_ID / key)")]
    results: list[CheckResult] = []
    settings_url = f"{settings.github_web_url}/settings/apps"
    async with GitHubClient(
        app_id=app_id,
        private_key=pem,
        api_url=settings.github_api_url,
        http=http,
        max_attempts=1,
        timeout=CONNECT_TIMEOUT_S * 2,
        verify=settings.httpx_verify(),
    ) as client:
        try:
            app = await client.request("GET", "/app", auth="app")
        except GitHubHTTPError as exc:
            fix = (
                "DEKSDENFLOW_GITHUB_APP_ID and the private key must belong to the same App "
                f"(App id and 'Private keys' at {settings_url}/<slug>); generate a new key if lost"
                if exc.status_code == 401
                else f"check DEKSDENFLOW_GITHUB_API_URL ({settings.github_api_url})"
            )
            return [fail("github app", f"GET /app answered {exc.status_code}: {first_line(str(exc))}", fix)]
        except DeksdenFlowError as exc:
            return [fail("github app", _error(exc),
                         f"check the private key and that {settings.github_api_url} is reachable")]
        slug = str(app.get("slug") or app_id)
        results.append(ok("github app", f"App {slug} (id {app.get('id', app_id)}) authenticated"))

        count = app.get("installations_count")
        if not isinstance(count, int):
            try:
                count = len(await client.get_all("/app/installations", auth="app"))
            except DeksdenFlowError as exc:
                count = None
                results.append(fail("github installations", _error(exc), "retry; check the App's key"))
        if isinstance(count, int):
            if count:
                results.append(ok("github installations", f"installed on {count} account(s)"))
            else:
                results.append(fail(
                    "github installations",
                    "the App is installed nowhere: no repository can send events",
                    f"install it: {settings.github_web_url}/apps/{slug}/installations/new",
                ))

        if secret:
            results.append(ok("github webhook secret", "set"))
        else:
            results.append(fail(
                "github webhook secret",
                "unset: /webhooks/github answers 503 to every delivery",
                "set DEKSDENFLOW_GITHUB_WEBHOOK_SECRET (or _FILE) to the App's webhook secret",
            ))

        manifest = ghp.load_manifest()
        lacking = ghp.missing_permissions(
            dict(manifest.get("default_permissions") or {}), app.get("permissions") or {}
        )
        events = ghp.missing_events(manifest.get("default_events") or [], app.get("events") or [])
        if lacking or events:
            wanted = [f"{k}: {v}" for k, v in lacking.items()] + [f"event {e}" for e in events]
            results.append(fail(
                "github permissions",
                "the App lacks " + ", ".join(wanted),
                f"grant them at {settings_url}/{slug}/permissions, then accept the new "
                "permissions on each installation",
            ))
        else:
            results.append(ok("github permissions", "permissions and events cover app.yml"))

        if settings.public_url:
            want = settings.public_url + GITHUB_HOOK_PATH
            try:
                hook = await client.request("GET", "/app/hook/config", auth="app")
            except DeksdenFlowError as exc:
                results.append(fail("github webhook url", _error(exc), "retry later"))
            else:
                got = str((hook or {}).get("url") or "")
                if got.rstrip("/") == want:
                    results.append(ok("github webhook url", want))
                else:
                    results.append(fail(
                        "github webhook url",
                        f"the App delivers to {got or 'nowhere'}, not {want}",
                        f"set the Webhook URL at {settings_url}/{slug} to {want}",
                    ))
    return results


async def _gitlab_projects(settings: Settings) -> list[tuple[str, str | None]]:
    """(name, forge id) of the enabled GitLab projects in our database; none if it is absent."""
    from sqlalchemy import select

    from bot.db import database_from_settings
    from bot.models import Project

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
    from bot.forge.gitlab_client import GitLabAPIError, GitLabClient, project_path

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
    results: list[CheckResult] = []
    try:
        try:
            token = await client.get("/personal_access_tokens/self")
        except GitLabAPIError as exc:
            if exc.status_code == 401:
                return [fail(
                    "gitlab token",
                    f"{settings.gitlab_url} rejected DEKSDENFLOW_GITLAB_TOKEN (401): "
                    "wrong, expired or revoked",
                    f"create a token with the api scope ({tokens_page}, or a project/group "
                    "access token, role Developer or higher) and set DEKSDENFLOW_GITLAB_TOKEN",
                )]
            if exc.status_code == 404:
                # GitLab before 15.5 has no /personal_access_tokens/self: the token is still
                # usable if /user answers, only its scopes cannot be listed
                try:
                    user = await client.get("/user")
                except GitLabAPIError:
                    user = None
                if user:
                    return [ok("gitlab token", f"valid (user {user.get('username')}); this GitLab "
                               "cannot list a token's scopes: make sure it has api")]
            if exc.status_code is None:
                return [fail(
                    "gitlab token",
                    f"cannot reach {settings.gitlab_url}: {exc.message}",
                    "check DEKSDENFLOW_GITLAB_URL (and DEKSDENFLOW_CA_BUNDLE for a private CA)",
                )]
            return [fail("gitlab token", first_line(str(exc)),
                         "check DEKSDENFLOW_GITLAB_URL: the GitLab base URL, without /api/v4")]
        scopes = [str(s) for s in (token or {}).get("scopes") or []]
        missing = [s for s in GITLAB_SCOPES if s not in scopes]
        if missing or (token or {}).get("active") is False:
            results.append(fail(
                "gitlab token",
                f"token {token.get('name')!r} has scopes {', '.join(scopes) or 'none'}; "
                f"needs {', '.join(GITLAB_SCOPES)}",
                f"create a token with the api scope ({tokens_page}) and set DEKSDENFLOW_GITLAB_TOKEN",
            ))
        else:
            expires = token.get("expires_at")
            results.append(ok(
                "gitlab token",
                f"token {token.get('name')!r} valid, scopes {', '.join(scopes)}"
                + (f", expires {expires}" if expires else ""),
            ))

        try:
            projects = await _gitlab_projects(settings)
        except Exception as exc:
            results.append(skip("gitlab hooks", f"cannot read the registered projects: {_error(exc)}"))
            return results
        if not projects:
            results.append(skip("gitlab hooks", "no GitLab project registered (`deksdenflow gitlab add`)"))
            return results
        if not settings.public_url:
            results.append(skip("gitlab hooks", "DEKSDENFLOW_PUBLIC_URL unset: cannot tell the right hook URL"))
            return results
        want = settings.public_url + GITLAB_HOOK_PATH
        for name, forge_id in projects:
            ref: str | int = int(forge_id) if forge_id and forge_id.isdigit() else name
            try:
                hooks = await client.get(f"/projects/{project_path(ref)}/hooks", {"per_page": 100})
            except GitLabAPIError as exc:
                results.append(fail(
                    f"gitlab hook {name}",
                    f"cannot list its hooks: {first_line(str(exc))}",
                    "the token needs Maintainer on the project to see its hooks",
                ))
                continue
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
                results.append(ok(f"gitlab hook {name}", f"delivers to {want}"))
            else:
                urls = ", ".join(str(h.get("url")) for h in hooks or []) or "none"
                results.append(fail(
                    f"gitlab hook {name}",
                    f"no hook delivers to {want} (hooks: {urls})",
                    f"deksdenflow gitlab add {name} --create-hook --hook-url {want}",
                ))
    finally:
        await client.aclose()
    return results


def _forges_configured(settings: Settings) -> bool:
    return bool(settings.github_app_id or settings.gitlab_token) or (
        settings.data_dir / "github-app.json"
    ).exists()


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
    client = http or httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S * 2, verify=settings.httpx_verify())
    try:
        response = await client.get(url, timeout=CONNECT_TIMEOUT_S * 2)
    except httpx.HTTPError as exc:
        return fail(
            name,
            f"GET {url} failed: {_error(exc)}",
            "start `serve`, and check DNS, the proxy or tunnel in front of it",
        )
    finally:
        if own:
            await client.aclose()
    if response.status_code != 200:
        return fail(name, f"GET {url} answered {response.status_code}",
                    "route the public URL to this server's port")
    theirs = response.headers.get(INSTANCE_HEADER)
    if theirs is None:
        return fail(name, f"{url} answers, but not as DeksdenFlow",
                    "route the public URL to this server's port")
    mine = instance_fingerprint(settings)
    if mine is not None and theirs != mine:
        return fail(
            name,
            f"{url} is another DeksdenFlow instance (different webhook secrets)",
            "point the public URL at this instance, or give both the same secrets",
        )
    return ok(name, f"{url} serves this instance")


async def run_checks(
    settings: Settings,
    *,
    offline: bool = False,
    cheap: bool = False,
    http: httpx.AsyncClient | None = None,
) -> list[CheckResult]:
    """Every check in report order; `cheap` leaves out the network and the model (for `serve`)."""
    async def one(name: str, check: Awaitable[CheckResult | list[CheckResult]]) -> list[CheckResult]:
        # a check that breaks is a failed line, not a traceback instead of the report
        try:
            result = await check
        except Exception as exc:
            return [fail(name, f"the check itself failed: {_error(exc)}", "report this as a bug")]
        return result if isinstance(result, list) else [result]

    results = [ok("settings", "valid")]
    results += await one("database", check_database(settings))
    results += await one("queue", check_queue(settings))
    results += await one("engine", check_engine(settings, offline=offline, cheap=cheap))
    if not cheap:
        results += await one("github app", check_github(settings, http=http))
        results += await one("gitlab token", check_gitlab(settings))
    results += await one("public url", check_public_url(settings, http=http, cheap=cheap))
    return results
