"""Settings validation, the CLI's subcommands, structured logs without secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bot.cli.main import main
from bot.core.errors import ConfigError
from bot.core.observability import configure_logging, log_context
from bot.core.settings import Settings, load_settings
from bot.web.app import create_app
from tests.conftest import GITHUB_SECRET, make_settings
from tests.intake.helpers import comment_body, github_headers


@pytest.mark.parametrize(
    "name,value,needle",
    [
        ("DEKSDENFLOW_TOKEN_BUDGET_MODE", "sometimes", "DEKSDENFLOW_TOKEN_BUDGET_MODE"),
        ("DEKSDENFLOW_MAX_TOKENS_PER_STEP", "lots", "DEKSDENFLOW_MAX_TOKENS_PER_STEP"),
        ("DEKSDENFLOW_REDIS_URL", "http://x", "DEKSDENFLOW_REDIS_URL"),
        ("DEKSDENFLOW_LOG_JSON", "maybe", "DEKSDENFLOW_LOG_JSON"),
        ("DEKSDENFLOW_GITHUB_API_URL", "ftp://x", "DEKSDENFLOW_GITHUB_API_URL"),
        ("DEKSDENFLOW_DB_URL", "mysql://x", "DEKSDENFLOW_DB_URL"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert needle in text and "\n" not in text


def test_cli_exits_2_with_the_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_TOKEN_BUDGET_MODE", "sometimes")
    assert main(["migrate"]) == 2
    assert "DEKSDENFLOW_TOKEN_BUDGET_MODE" in capsys.readouterr().err


def test_defaults_are_the_embedded_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    settings = load_settings()
    assert settings.memory_queue
    # per user, not per working directory (issue 14)
    assert settings.database_url == f"sqlite:///{tmp_path}/xdg/deksdenflow/deksdenflow.sqlite3"
    assert settings.github_api_url == "https://api.github.com"
    assert settings.async_database_url.startswith("sqlite+aiosqlite:///")
    pg = Settings(db_url="postgresql://u@h/db")
    assert pg.database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("command", ["serve", "worker", "migrate", "protocol"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: deksdenflow" in capsys.readouterr().out


def test_migrate_command_builds_the_sqlite_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "d"))
    assert main(["migrate"]) == 0
    assert (tmp_path / "d" / "deksdenflow.sqlite3").exists()


def test_worker_refuses_the_in_process_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path))
    assert main(["worker"]) == 2


def test_json_logs_carry_context_and_never_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "ghs_supersecretinstallationtoken123"
    configure_logging("INFO", True, [secret, GITHUB_SECRET])
    try:
        log = logging.getLogger("bot.test")
        with log_context(delivery_id=7, protocol_run_id=3):
            log.info("using token %s for %s", secret, "acme/widgets")
            try:
                raise RuntimeError(f"request failed with {GITHUB_SECRET}")
            except RuntimeError:
                log.exception("boom")
        lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    finally:
        configure_logging("WARNING", False, [])
    assert lines[0]["delivery_id"] == 7 and lines[0]["protocol_run_id"] == 3
    assert "acme/widgets" in lines[0]["msg"]
    dump = json.dumps(lines)
    assert secret not in dump and GITHUB_SECRET not in dump
    assert "[redacted]" in dump


def test_a_request_cycle_logs_no_secret(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, log_json=True, log_level="DEBUG")
    with TestClient(create_app(settings)) as client:
        body = comment_body()
        client.post("/webhooks/github", content=body, headers=github_headers(body))
        bad = github_headers(body)
        bad["X-Hub-Signature-256"] = "sha256=" + GITHUB_SECRET
        client.post("/webhooks/github", content=body, headers=bad)
    out = capsys.readouterr()
    for value in settings.secret_values():
        assert value not in out.err and value not in out.out
