"""The GitHub App's credentials at rest: sealed in the database, or the file an older version wrote.

/github/setup writes them (bot/web/github_app.py); the worker's forge factory, the app and the
doctor read them. Storage only: no HTTP here, so the jobs never import the web layer for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.storage.db import Database
from bot.storage.secretbox import GITHUB_APP, fernet_of, get_secret, put_secret

log = logging.getLogger(__name__)
CREDENTIALS_FILE = "github-app.json"


KEPT_FIELDS = ("id", "slug", "pem", "webhook_secret", "client_id", "html_url")


async def store_credentials(
    settings: Settings, db: Database, conversion: dict[str, Any]
) -> dict[str, Any]:
    """Keep what the service needs, sealed in the database where every process can read it."""
    kept = {k: conversion.get(k) for k in KEPT_FIELDS}
    await put_secret(db, fernet_of(settings), GITHUB_APP, kept)
    return kept


async def load_stored_credentials(settings: Settings, db: Database) -> dict[str, Any] | None:
    return await get_secret(db, fernet_of(settings), GITHUB_APP)


async def read_app_credentials(settings: Settings, db: Database) -> dict[str, Any] | None:
    """The App made through /github/setup: sealed in the database, else the older file.

    A process whose key cannot open the row logs why and carries on (GitLab and local jobs
    need no App) rather than dying at start.
    """
    try:
        stored = await load_stored_credentials(settings, db)
    except ConfigError as exc:
        log.error(
            "GitHub App credentials unreadable (%s): set one DEKSDENFLOW_SECRET_KEY everywhere", exc
        )
        stored = None
    return stored or load_credentials(settings.data_dir)


def load_credentials(data_dir: Path) -> dict[str, Any] | None:
    """The file an earlier version wrote (API container only): read as a fallback, never written."""
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
