"""`deksdenflow doctor` end to end through the CLI: fake GitHub (respx), fake GitLab (HTTP server),
a stopped Redis port, a database behind a wrong port, a missing or working engine."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from bot.cli.main import main
from bot.core.settings import Settings
from bot.domain.doctor_results import (
    INSTANCE_HEADER,
    CheckResult,
    exit_code,
    instance_fingerprint,
    is_loopback_host,
    namespaces_of,
    render,
    safe_url,
)
from tests.fakes.codex_fixtures import find_codex_bin
from tests.fakes.fake_model import FakeModelServer, final, write_codex_home
from tests.gitlab.fake_gitlab import FakeGitLab, fake_gitlab

__all__ = ["fake_gitlab"]

API = "https://api.github.com"
PUBLIC = "https://bot.example.test"
GH_SECRET = "gh-doctor-secret"
GL_SECRET = "gl-doctor-secret"
MANIFEST_PERMISSIONS = {
    "contents": "write",
    "workflows": "write",
    "issues": "write",
    "pull_requests": "write",
    "checks": "write",
    "actions": "read",
    "statuses": "read",
    "metadata": "read",
}
MANIFEST_EVENTS = [
    "issue_comment",
    "issues",
    "pull_request",
    "check_suite",
    "check_run",
    "workflow_run",
    "pull_request_review",
    "pull_request_review_comment",
    "status",  # status last: one test drops it
]


def free_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A clean, valid baseline: scripted engine, embedded queue, SQLite in tmp, no forge."""
    values = {"DEKSDENFLOW_DATA_DIR": str(tmp_path / "data"), "DEKSDENFLOW_ENGINE": "scripted"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def line_of(out: str, name: str) -> str:
    """The line of check `name` and its fix line, if any."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[2:].startswith(f"{name}:"):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("    fix:") else ""
            return line + "\n" + fix
    raise AssertionError(f"no {name!r} line in:\n{out}")


def assert_failed_with_fix(out: str, name: str, *needles: str) -> None:
    text = line_of(out, name)
    assert text.startswith("✘"), text
    assert "fix:" in text, text
    for needle in needles:
        assert needle in text, text


# --- the baseline and the pure parts ------------------------------------------------------------


def test_baseline_passes_and_json_lists_every_check(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert line_of(out, "settings").startswith("✔")
    assert line_of(out, "queue").startswith("✔")
    assert out.rstrip().endswith("all checks passed")
    code, out = doctor(capsys, "--offline", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    names = [c["name"] for c in data["checks"]]
    assert names[:4] == ["settings", "database", "queue", "engine"]
    assert {c["status"] for c in data["checks"]} <= {"ok", "skip"}


def test_bad_setting_is_a_failed_check_not_a_crash(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", "http://nope")
    code, out = doctor(capsys)
    assert code == 1
    assert_failed_with_fix(out, "settings", "DEKSDENFLOW_REDIS_URL")
    code, out = doctor(capsys, "--json")
    assert code == 1 and json.loads(out)["checks"][0]["status"] == "fail"


def test_pure_helpers() -> None:
    assert safe_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert safe_url("redis://h:6379/0") == "redis://h:6379/0"
    assert is_loopback_host("127.0.0.1") and is_loopback_host("localhost")
    assert is_loopback_host("[::1]") and not is_loopback_host("bot.example.com")
    assert namespaces_of("a/b/c") == ["a/b", "a"]
    results = [CheckResult("x", "ok", "fine"), CheckResult("y", "fail", "bad", "do this")]
    assert exit_code(results) == 1 and "✘ y: bad\n    fix: do this" in render(results)
    assert instance_fingerprint(Settings()) is None
    one = instance_fingerprint(Settings(github_webhook_secret=SecretStr("a")))
    assert one and one == instance_fingerprint(Settings(github_webhook_secret=SecretStr("a")))
    assert one != instance_fingerprint(Settings(github_webhook_secret=SecretStr("b")))


# --- infrastructure -----------------------------------------------------------------------------


def test_stopped_redis_port(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", f"redis://:pw@127.0.0.1:{free_port()}/0")
    code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "queue", "unreachable", "DEKSDENFLOW_REDIS_URL")
    assert ":pw@" not in out


@pytest.mark.redis
def test_real_redis_answers(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import TEST_REDIS_URL

    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", TEST_REDIS_URL)
    code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert line_of(out, "queue").startswith("✔")


def test_database_behind_a_wrong_port(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DEKSDENFLOW_DB_URL", f"postgresql://postgres:pw@127.0.0.1:{free_port()}/postgres"
    )
    code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "database", "cannot connect", "DEKSDENFLOW_DB_URL")
    assert ":pw@" not in out


@pytest.mark.postgres
def test_postgres_at_head_and_behind(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_url: str,
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", postgres_url)
    code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert "migrations at head" in line_of(out, "database")


@pytest.mark.postgres
def test_postgres_not_migrated(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uuid

    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL

    name = f"df_doctor_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        monkeypatch.setenv("DEKSDENFLOW_DB_URL", PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
        code, out = doctor(capsys, "--offline")
        assert code == 1
        assert_failed_with_fix(out, "database", "not at head", "deksdenflow migrate")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# --- the engine ---------------------------------------------------------------------------------


def test_missing_engine(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_ENGINE", "codex")
    monkeypatch.setenv("DEKSDENFLOW_CODEX_BIN", "/nonexistent/bin/codex")
    code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "engine", "not found", "DEKSDENFLOW_CODEX_BIN", "npm install")


@pytest.fixture
def codex_env(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeModelServer]:
    found = find_codex_bin()
    if found is None:
        pytest.fail("the codex CLI is not installed (npm install, or DEKSDENFLOW_CODEX_BIN)")
    with FakeModelServer() as server:
        home = write_codex_home(tmp_path / "codex-home", server.base_url, env_key="CODEX_API_KEY")
        monkeypatch.setenv("DEKSDENFLOW_ENGINE", "codex")
        monkeypatch.setenv("DEKSDENFLOW_CODEX_BIN", found)
        monkeypatch.setenv("CODEX_HOME", str(home))
        monkeypatch.setenv("CODEX_API_KEY", "fake-key-for-tests")
        yield server


@pytest.mark.codex
def test_engine_binary_and_model_call(
    codex_env: FakeModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    codex_env.enqueue(final("OK"))
    code, out = doctor(capsys)
    assert code == 0, out
    assert line_of(out, "engine").startswith("✔ engine: codex")
    assert line_of(out, "model call").startswith("✔")
    assert len(codex_env.response_requests()) == 1
    code, out = doctor(capsys, "--offline")
    assert line_of(out, "model call").startswith("–") and len(codex_env.response_requests()) == 1


@pytest.mark.codex
def test_model_call_that_cannot_authenticate(
    codex_env: FakeModelServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a provider that needs a key the environment does not have: codex refuses the turn
    home = write_codex_home(tmp_path / "other-home", codex_env.base_url, env_key="MISSING_KEY")
    monkeypatch.setenv("CODEX_HOME", str(home))
    code, out = doctor(capsys)
    assert code == 1
    assert_failed_with_fix(out, "model call", "did not answer", "CODEX_API_KEY", "--offline")


# --- GitHub -------------------------------------------------------------------------------------


@pytest.fixture
def github_env(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_key: str
) -> dict[str, str]:
    key_file = tmp_path / "app.pem"
    key_file.write_text(private_key)
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(GH_SECRET + "\n")
    values = {
        "DEKSDENFLOW_GITHUB_APP_ID": "4242",
        "DEKSDENFLOW_GITHUB_PRIVATE_KEY_FILE": str(key_file),  # the _FILE form, as in compose
        "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET_FILE": str(secret_file),
        "DEKSDENFLOW_PUBLIC_URL": PUBLIC,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def github_app(**overrides: Any) -> dict[str, Any]:
    app: dict[str, Any] = {
        "id": 4242,
        "slug": "deksdenflow-test",
        "permissions": dict(MANIFEST_PERMISSIONS),
        "events": list(MANIFEST_EVENTS),
        "installations_count": 2,
    }
    app.update(overrides)
    return app


def mock_github(router: respx.Router, app: dict[str, Any] | None, *, status: int = 200) -> None:
    body = app if app is not None else {"message": "A JSON web token could not be decoded"}
    router.get(f"{API}/app").mock(return_value=httpx.Response(status, json=body))
    router.get(f"{API}/app/hook/config").mock(
        return_value=httpx.Response(200, json={"url": PUBLIC + "/webhooks/github"})
    )
    fingerprint = instance_fingerprint(Settings(github_webhook_secret=SecretStr(GH_SECRET)))
    assert fingerprint is not None
    router.get(PUBLIC + "/healthz").mock(
        return_value=httpx.Response(
            200, json={"status": "ok"}, headers={INSTANCE_HEADER: fingerprint}
        )
    )


def test_github_valid_credentials(
    github_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, github_app())
        code, out = doctor(capsys, "--offline")
        jwt = router.calls[0].request.headers["authorization"]
    assert code == 0, out
    assert jwt.lower().startswith("bearer ey")  # the App JWT, not a token
    for name in (
        "github app",
        "github installations",
        "github webhook secret",
        "github permissions",
        "github webhook url",
        "public url",
    ):
        assert line_of(out, name).startswith("✔"), out
    assert "installed on 2" in out and "serves this instance" in out


def test_github_invalid_credentials(
    github_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, None, status=401)
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "github app", "401", "DEKSDENFLOW_GITHUB_APP_ID")


def test_github_missing_permissions_and_events(
    github_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    granted = {k: v for k, v in MANIFEST_PERMISSIONS.items() if k != "workflows"}
    granted["checks"] = "read"
    app = github_app(permissions=granted, events=MANIFEST_EVENTS[:-1], installations_count=0)
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, app)
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(
        out,
        "github permissions",
        "workflows: write",
        "checks: write",
        "event status",
        "/settings/apps/deksdenflow-test/permissions",
    )
    assert_failed_with_fix(out, "github installations", "installations/new")


def test_github_webhook_secret_unset_and_wrong_public_url(
    github_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEKSDENFLOW_GITHUB_WEBHOOK_SECRET_FILE")
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, github_app())
        # another server answers at the public URL
        router.get(PUBLIC + "/healthz").mock(return_value=httpx.Response(200, text="hello"))
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "github webhook secret", "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET")
    assert_failed_with_fix(out, "public url", "not as DeksdenFlow")


def test_public_url_unset_or_loopback_with_a_forge(
    github_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_PUBLIC_URL", "http://127.0.0.1:8000")
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, github_app())
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "public url", "loopback", "tunnel")
    monkeypatch.delenv("DEKSDENFLOW_PUBLIC_URL")
    with respx.mock(assert_all_called=False) as router:
        mock_github(router, github_app())
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "public url", "unset", "https://")


# --- GitLab -------------------------------------------------------------------------------------


@pytest.fixture
def gitlab_env(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fake_gitlab: FakeGitLab
) -> FakeGitLab:
    # with /api/v4 on the end, as people copy it from GitLab's docs: normalised away
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_URL", fake_gitlab.url + "/api/v4/")
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_TOKEN", fake_gitlab.token)
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_WEBHOOK_SECRET", GL_SECRET)
    monkeypatch.setenv("DEKSDENFLOW_PUBLIC_URL", PUBLIC)
    return fake_gitlab


def healthz_mock(router: respx.Router) -> None:
    fingerprint = instance_fingerprint(Settings(gitlab_webhook_secret=SecretStr(GL_SECRET)))
    assert fingerprint is not None
    router.get(PUBLIC + "/healthz").mock(
        return_value=httpx.Response(
            200, json={"status": "ok"}, headers={INSTANCE_HEADER: fingerprint}
        )
    )


def test_gitlab_valid_token_and_hook(
    gitlab_env: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    gitlab_env.add_project("acme/widgets", project_id=7)
    hook_url = PUBLIC + "/webhooks/gitlab"
    assert main(["gitlab", "add", "acme/widgets", "--create-hook", "--hook-url", hook_url]) == 0
    capsys.readouterr()
    hook = gitlab_env.state.hooks[7][0]
    assert hook["confidential_issues_events"] is True and hook["confidential_note_events"] is True
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert "scopes api" in line_of(out, "gitlab token")
    assert line_of(out, "gitlab hook acme/widgets").startswith("✔")
    assert not any("/api/v4/api/v4" in r.path for r in gitlab_env.requests)


def test_gitlab_invalid_token(
    gitlab_env: FakeGitLab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_TOKEN", "glpat-wrong")
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "gitlab token", "401", "api scope", "DEKSDENFLOW_GITLAB_TOKEN")


def test_gitlab_token_without_api_scope(
    gitlab_env: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    gitlab_env.state.token_info[gitlab_env.token] = {"scopes": ["read_api", "read_repository"]}
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(out, "gitlab token", "read_api", "needs api")


def test_gitlab_hook_pointing_elsewhere(
    gitlab_env: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    gitlab_env.add_project("acme/widgets", project_id=7)
    old = "https://old.example.test/webhooks/gitlab"
    assert main(["gitlab", "add", "acme/widgets", "--create-hook", "--hook-url", old]) == 0
    capsys.readouterr()
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 1
    assert_failed_with_fix(
        out,
        "gitlab hook acme/widgets",
        old,
        f"deksdenflow gitlab add acme/widgets --create-hook --hook-url {PUBLIC}/webhooks/gitlab",
    )


def test_gitlab_group_hook_serves_its_projects(
    gitlab_env: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    group = gitlab_env.add_group("acme")
    sub = gitlab_env.add_group("acme/tools", parent_id=group["id"])
    gitlab_env.add_project("acme/widgets", group=group, project_id=7)
    gitlab_env.add_project("acme/tools/hammer", group=sub, project_id=8)
    hook_url = PUBLIC + "/webhooks/gitlab"
    code = main(["gitlab", "add", "acme", "--group", "--create-hook", "--hook-url", hook_url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "acme/widgets" in out and "acme/tools/hammer" in out
    (hook,) = gitlab_env.state.group_hooks[group["id"]]
    assert hook["url"] == hook_url and hook["confidential_note_events"] is True
    assert gitlab_env.state.hooks[7] == [] and gitlab_env.state.hooks[8] == []
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert line_of(out, "gitlab hook acme/tools/hammer").startswith("✔")


def test_gitlab_older_than_15_5_still_checks_the_token(
    gitlab_env: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    gitlab_env.fail("/personal_access_tokens/self", status=404, times=5)
    with respx.mock(assert_all_called=False) as router:
        healthz_mock(router)
        code, out = doctor(capsys, "--offline")
    assert code == 0, out
    assert "cannot list a token's scopes" in line_of(out, "gitlab token")
