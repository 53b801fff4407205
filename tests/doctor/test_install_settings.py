"""Install-time settings: `…_FILE` secrets, GITLAB_URL normalisation, the CA bundle, the port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.cli.main import main
from bot.core.errors import ConfigError
from bot.core.settings import Settings, external_file_env, file_fields, load_settings


def test_every_secret_setting_accepts_a_file() -> None:
    names = set(file_fields(Settings))
    secrets = {
        name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)
    }
    assert secrets and secrets <= names
    assert {"db_url", "redis_url", "github_private_key", "gitlab_token"} <= names


def test_file_secrets_are_read_without_the_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in file_fields(Settings):
        value = f"value-of-{name}"
        if name == "db_url":
            value = "postgresql://u:pw@db/x"
        if name == "redis_url":
            value = "redis://:pw@redis:6379/0"
        path = tmp_path / name
        path.write_text(value + "\n")
        monkeypatch.setenv(f"DEKSDENFLOW_{name.upper()}_FILE", str(path))
    settings = load_settings()
    assert settings.gitlab_token is not None
    assert settings.gitlab_token.get_secret_value() == "value-of-gitlab_token"
    assert settings.github_private_key_pem() == "value-of-github_private_key"
    assert settings.db_url == "postgresql://u:pw@db/x"
    assert settings.redis_url == "redis://:pw@redis:6379/0"


def test_a_pem_file_keeps_its_inner_newlines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = "-----BEGIN KEY-----\nabc\n-----END KEY-----\n"
    (tmp_path / "key").write_text(pem)
    monkeypatch.setenv("DEKSDENFLOW_GITHUB_PRIVATE_KEY_FILE", str(tmp_path / "key"))
    assert load_settings().github_private_key_pem() == pem[:-1]


def test_file_and_variable_together_or_a_missing_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "s").write_text("a")
    monkeypatch.setenv("DEKSDENFLOW_API_TOKEN_FILE", str(tmp_path / "s"))
    monkeypatch.setenv("DEKSDENFLOW_API_TOKEN", "b")
    with pytest.raises(ConfigError, match="both set"):
        load_settings()
    monkeypatch.delenv("DEKSDENFLOW_API_TOKEN")
    monkeypatch.setenv("DEKSDENFLOW_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "DEKSDENFLOW_API_TOKEN_FILE" in str(err.value) and "\n" not in str(err.value)
    assert main(["migrate"]) == 2  # the CLI reports it like any bad value


def test_codex_api_key_file() -> None:
    assert external_file_env({}) == {}
    assert external_file_env({"CODEX_API_KEY": "set", "CODEX_API_KEY_FILE": "/nope"}) == {}


def test_codex_api_key_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("sk-123\n")
    assert external_file_env({"CODEX_API_KEY_FILE": str(tmp_path / "k")}) == {
        "CODEX_API_KEY": "sk-123"
    }


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("https://gitlab.example.com/api/v4", "https://gitlab.example.com"),
        ("https://gitlab.example.com/api/v4/", "https://gitlab.example.com"),
        ("https://host/gitlab/api/v4", "https://host/gitlab"),  # relative URL root
        ("https://gitlab.com/", "https://gitlab.com"),
        ("https://gitlab.com", "https://gitlab.com"),
    ],
)
def test_gitlab_url_normalised(raw: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_URL", raw)
    assert load_settings().gitlab_url == expected


def test_public_url_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().public_url is None and Settings().port == 8000
    monkeypatch.setenv("DEKSDENFLOW_PUBLIC_URL", "https://bot.example.com/")
    monkeypatch.setenv("DEKSDENFLOW_PORT", "8080")
    settings = load_settings()
    assert settings.public_url == "https://bot.example.com" and settings.port == 8080
    monkeypatch.setenv("DEKSDENFLOW_PUBLIC_URL", "bot.example.com")
    with pytest.raises(ConfigError, match="DEKSDENFLOW_PUBLIC_URL"):
        load_settings()


def test_ca_bundle_reaches_httpx_python_gitlab_and_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certifi

    from bot.forge.github_client import GitHubClient
    from bot.forge.gitlab import gitlab_forge

    bundle = tmp_path / "ca.pem"
    bundle.write_text(Path(certifi.where()).read_text())
    monkeypatch.setenv("DEKSDENFLOW_CA_BUNDLE", str(bundle))
    settings = load_settings()
    assert settings.tls_verify == str(bundle)
    assert settings.git_env() == {"GIT_SSL_CAINFO": str(bundle)}
    forge = gitlab_forge("https://gitlab.example.com", "t", ssl_verify=settings.tls_verify)
    assert forge.client._gl.ssl_verify == str(bundle)
    forge.client.close()
    context = settings.httpx_verify()
    assert not isinstance(context, bool) and context.cert_store_stats()["x509_ca"] > 0
    client = GitHubClient(verify=context)
    asyncio.run(client.aclose())
    monkeypatch.setenv("DEKSDENFLOW_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="DEKSDENFLOW_CA_BUNDLE"):
        load_settings()


def test_cli_exports_the_ca_bundle_to_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    monkeypatch.setenv("DEKSDENFLOW_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GIT_SSL_CAINFO", "restored-after-the-test")
    assert main(["migrate"]) == 0
    assert os.environ["GIT_SSL_CAINFO"] == str(bundle)
