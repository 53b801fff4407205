"""`deksdenflow doctor`: is this install able to work? One ✔/✘ line per check, a fix for each ✘.

Result types and the comparisons are pure; each check is a small async function doing its own
I/O with a short timeout, so one unreachable system costs seconds, not the whole run. The checks
of the forges and of the public URL are in bot/cli/doctor_forges.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx

from bot.cli.doctor_forges import check_github, check_gitlab, check_public_url
from bot.core.errors import DeksdenFlowError
from bot.core.settings import Settings
from bot.domain.doctor_results import (
    CODEX_INSTALL,
    CONNECT_TIMEOUT_S,
    MODEL_CALL_TIMEOUT_S,
    CheckResult,
    describe_error,
    fail,
    first_line,
    ok,
    safe_url,
    skip,
)
from bot.domain.spec import BUILTIN_MODEL
from bot.storage.migrate import alembic_config
from engines.base import EngineRequest
from engines.codex import CodexEngine


def _database_state(url: str) -> tuple[set[str], set[str]]:
    """(current revisions, head revisions): runs in a thread, the engine is sync."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

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
            f"cannot connect to {shown}: {describe_error(exc)}",
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
            f"Redis at {shown} unreachable: {describe_error(exc)}",
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


async def check_engine(
    settings: Settings, *, offline: bool, cheap: bool = False
) -> list[CheckResult]:
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
            error = describe_error(exc)
        else:
            if result.ok:
                return ok(name, f"model {model} answered ({result.usage.total} tokens)")
            error = first_line(result.error or result.final_message or result.outcome)
    return fail(
        name,
        f"model {model} did not answer: {error}",
        "set CODEX_API_KEY (or CODEX_API_KEY_FILE), or configure the provider in "
        "$CODEX_HOME/config.toml; run doctor --offline to skip this check",
    )


async def run_checks(
    settings: Settings,
    *,
    offline: bool = False,
    cheap: bool = False,
    http: httpx.AsyncClient | None = None,
) -> list[CheckResult]:
    """Every check in report order; `cheap` leaves out the network and the model (for `serve`)."""

    async def one(
        name: str, check: Awaitable[CheckResult | list[CheckResult]]
    ) -> list[CheckResult]:
        # a check that breaks is a failed line, not a traceback instead of the report
        try:
            result = await check
        except Exception as exc:
            return [
                fail(
                    name, f"the check itself failed: {describe_error(exc)}", "report this as a bug"
                )
            ]
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
