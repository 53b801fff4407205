"""The secret scanner: exact values and their encodings, credential shapes, redaction (pure)."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from bot.domain.secrets_scan import (
    REDACTED,
    SecretScanner,
    is_secret_env_name,
    needles_for,
    secrets_in_environ,
)
from bot.git.ops import scan_log_patch

SECRET = "s3cr3t-V4lue-for-the-scanner"
GHS = "ghs_" + "A1b2C3d4" * 5
GLPAT = "glpat-" + "x" * 20
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA"
    + "q" * 48
    + "\n-----END RSA PRIVATE KEY-----\n"
)
AWS = "AKIA" + "ABCDEFGHIJKLMNOP"


@pytest.mark.parametrize(
    "text",
    [
        f"plain {SECRET} in a line",
        base64.b64encode(SECRET.encode()).decode(),
        base64.b64encode(f"TOKEN={SECRET}\n".encode()).decode(),  # inside a longer blob
        base64.b64encode(f"xy{SECRET}".encode()).decode(),
        base64.urlsafe_b64encode(f"x{SECRET}?".encode()).decode(),
        urllib.parse.quote(SECRET + "/+", safe="").replace("%2F%2B", ""),
    ],
)
def test_values_and_their_encodings_are_found(text: str) -> None:
    scanner = SecretScanner([SECRET])
    assert scanner.kinds_in(text)
    assert SECRET not in scanner.redact(text)
    assert scanner.kinds_in(scanner.redact(text)) == []


@pytest.mark.parametrize("text", [GHS, GLPAT, PEM, AWS, "aws_secret_access_key = " + "a" * 40])
def test_credential_patterns_are_found_without_configuration(text: str) -> None:
    scanner = SecretScanner()
    assert scanner.kinds_in(f"look: {text} end")
    assert REDACTED in scanner.redact(text)


def test_harmless_text_and_short_values() -> None:
    scanner = SecretScanner([SECRET, "short"])
    assert scanner.kinds_in("nothing to see, not even short words like shorts") == []
    assert needles_for("1234567") == {}


def test_redact_obj_walks_json() -> None:
    scanner = SecretScanner([SECRET])
    value = {"a": [SECRET, {"b": f"x{SECRET}y", SECRET: 1}], "n": 3}
    out = scanner.redact_obj(value)
    assert SECRET not in repr(out)
    assert out["n"] == 3


def test_environment_secrets() -> None:
    env = {
        "CODEX_API_KEY": "sk-codex-key-123456",
        "GITHUB_TOKEN": "ghs_token_value_abc",
        "DEKSDENFLOW_API_TOKEN": "api-token-value-1",
        "DEKSDENFLOW_BOT_NAME": "DeksdenFlow",
        "DEKSDENFLOW_DB_URL": "postgresql://bot:pg-pass-word-9@db/x",
        "PATH": "/usr/bin",
    }
    found = secrets_in_environ(env)
    assert {
        "sk-codex-key-123456",
        "ghs_token_value_abc",
        "api-token-value-1",
        "pg-pass-word-9",
    } <= set(found)
    assert "DeksdenFlow" not in found and "/usr/bin" not in found
    assert is_secret_env_name("GITLAB_WEBHOOK_SECRET") and not is_secret_env_name("HOME")


def test_scan_log_patch_names_files_and_messages_not_values() -> None:
    wrapped = base64.encodebytes(f"export TOKEN={SECRET}\n".encode() * 3).decode()
    patch = (
        "\0" + "a" * 40 + "\nfeat: add things\n\0\n"
        "diff --git a/ok.txt b/ok.txt\n+++ b/ok.txt\n+harmless\n"
        "diff --git a/leak.b64 b/leak.b64\n+++ b/leak.b64\n"
        + "".join(f"+{line}\n" for line in wrapped.splitlines())
        + "\0" + "b" * 40 + f"\nmessage with {GHS}\n\0\n"
        "diff --git a/removed.txt b/removed.txt\n--- a/removed.txt\n-" + SECRET + "\n"
    )  # fmt: skip
    findings = scan_log_patch(patch, SecretScanner([SECRET]))
    places = {f.where for f in findings}
    assert places == {"leak.b64", f"the message of commit {'b' * 12}"}
    assert all(SECRET not in str(f) and GHS not in str(f) for f in findings)


def test_registered_secrets_are_bounded_and_found_by_the_process_scanner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bot.domain import secrets_scan
    from bot.domain.secrets_scan import (
        MAX_REGISTERED,
        process_scanner,
        register_secrets,
        registered_secrets,
    )

    monkeypatch.setattr(secrets_scan, "_registered", {})  # this process's own list stays as it was
    register_secrets([f"minted-token-{i:06d}" for i in range(MAX_REGISTERED + 5)])
    kept = registered_secrets()
    assert len(kept) <= MAX_REGISTERED
    assert "minted-token-000000" not in kept and f"minted-token-{MAX_REGISTERED + 4:06d}" in kept
    assert process_scanner(environ={}).kinds_in(f"x minted-token-{MAX_REGISTERED + 4:06d} y")
