"""Helpers for intake tests: signing, posting and reading the delivery table."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

from sqlalchemy import create_engine, text

from tests.conftest import GITHUB_SECRET, GITLAB_SECRET


def sign(body: bytes, secret: str = GITHUB_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(
    body: bytes, event: str = "issue_comment", delivery: str | None = None
) -> dict[str, str]:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body),
        "Content-Type": "application/json",
    }


def gitlab_headers(event: str = "Note Hook", key: str | None = None) -> dict[str, str]:
    headers = {
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": GITLAB_SECRET,
        "Content-Type": "application/json",
    }
    if key:
        headers["Idempotency-Key"] = key
    return headers


def comment_body(text_: str = "Thanks, looks good", **extra: Any) -> bytes:
    payload = {
        "action": "created",
        "issue": {"number": 7, "title": "Add a README", "body": "please"},
        "comment": {"id": 99, "body": text_, "user": {"login": "alice", "type": "User"}},
        "repository": {
            "full_name": "acme/widgets",
            "clone_url": "https://github.com/acme/widgets.git",
        },
        "sender": {"login": "alice", "type": "User"},
        "installation": {"id": 42},
        **extra,
    }
    return json.dumps(payload).encode()


def sync_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def rows(url: str, sql: str) -> list[Any]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()
