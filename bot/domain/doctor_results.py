"""`deksdenflow doctor`'s results and the pure comparisons its checks share (no I/O).

bot/cli/doctor.py (database, queue, engine) and bot/cli/doctor_forges.py (GitHub, GitLab, URL)
both build on these; keeping them here lets the one run the other without an import cycle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from bot.core.errors import ConfigError
from bot.core.settings import Settings

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


def describe_error(exc: BaseException) -> str:
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
    return (
        host in ("localhost", "::1", "0.0.0.0")
        or host.startswith("127.")
        or host.endswith(".localhost")
    )


def hook_points_at(hooks: Iterable[Mapping[str, Any]], url: str) -> bool:
    want = url.rstrip("/")
    return any(str(h.get("url") or "").rstrip("/") == want for h in hooks)


def namespaces_of(path_with_namespace: str) -> list[str]:
    """`a/b/c` → [`a/b`, `a`]: the groups whose hooks may serve project c."""
    parts = path_with_namespace.strip("/").split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


# --- checks -------------------------------------------------------------------------------------
