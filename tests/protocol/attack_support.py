"""Shared by the attack tests: the worker's secrets, and a search for them everywhere they may not
be."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.domain.secrets_scan import SecretScanner
from bot.storage.models import Event, ForgeRecord, ProtocolRun, StepRun
from tests.gitutil import GIT_ENV

ATTACK_CODEX = Path(__file__).resolve().parents[1] / "fakes" / "attack_codex.py"

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAwJ0attackTestKeyMaterialNotARealKey0123456789abcd\n"
    "efghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefgh\n"
    "-----END RSA PRIVATE KEY-----\n"
)
GITHUB_TOKEN = "ghs_" + "AttackTestToken0123456789abcdefghij"
STORED_WEBHOOK_SECRET = "whsec-stored-attack-0123456789"
# what tests.conftest.make_settings configures
SETTINGS_SECRETS = (
    "api-test-token-0123456789",
    "gh-test-secret-0123456789",
    "gl-test-secret-0123456789",
)


def worker_secrets() -> list[str]:
    """Every secret value the worker holds in these tests (settings, env, stored credentials)."""
    return [*SETTINGS_SECRETS, GITHUB_TOKEN, STORED_WEBHOOK_SECRET, PEM]


def store_app_credentials(data_dir: Path) -> None:
    """App credentials on disk as an older /github/setup left them (still read as a fallback)."""
    import json
    import os

    from bot.core.fsperm import ensure_private_dir
    from bot.storage.app_credentials import CREDENTIALS_FILE

    ensure_private_dir(data_dir)
    fd = os.open(data_dir / CREDENTIALS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"id": 1, "pem": PEM, "webhook_secret": STORED_WEBHOOK_SECRET}, fh)


@pytest.fixture(params=["tmp", "elsewhere"])
def data_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """DATA_DIR under /tmp (what Codex would make writable by default), and outside it."""
    if request.param == "tmp":
        yield tmp_path / "data"
        return
    with tempfile.TemporaryDirectory(prefix="df-attack-", dir="/var/tmp") as elsewhere:
        yield Path(elsewhere) / "data"


def standin_bin(tmp_path: Path) -> Path:
    """An executable wrapper around attack_codex.py, as a `codex` binary would be."""
    wrapper = tmp_path / "bin" / "codex"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ATTACK_CODEX}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def origin_dump(origin: Path) -> str:
    """Every object in the origin (reachable or not) as text."""
    out = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"],
        cwd=origin, env={**GIT_ENV, "PATH": "/usr/bin:/bin"}, capture_output=True, check=True,
    )  # fmt: skip
    return out.stdout.decode("utf-8", "replace")


async def stored_texts(ctx: dict[str, Any]) -> dict[str, str]:
    """What the database holds that a human or the forge sees: events, forge records, run state."""
    async with ctx["db"].sessions() as session:
        events = (await session.execute(select(Event))).scalars().all()
        records = (await session.execute(select(ForgeRecord))).scalars().all()
        runs = (await session.execute(select(ProtocolRun))).scalars().all()
        steps = (await session.execute(select(StepRun))).scalars().all()
    return {
        "events": json.dumps([[e.event_type, e.message, e.metadata_] for e in events], default=str),
        "forge records (comments, statuses, check runs, PRs)": json.dumps(
            [[r.kind, r.body, r.data] for r in records], default=str
        ),
        "runs": json.dumps([r.runtime_state for r in runs], default=str),
        "steps": json.dumps([s.runtime_state for s in steps], default=str),
    }


async def leaks(ctx: dict[str, Any], origin: Path, log_text: str) -> list[str]:
    """Where any worker secret (or its base64 form, or a key's shape) turned up; empty = none."""
    scanner = SecretScanner(worker_secrets())
    places = {"the origin repository": origin_dump(origin), "logs": log_text}
    places.update(await stored_texts(ctx))
    return [
        f"{kinds} in {where}" for where, text in places.items() if (kinds := scanner.kinds_in(text))
    ]


def recorded_prompts(record: Path) -> list[dict[str, str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
