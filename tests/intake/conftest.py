"""Fixtures shared by the intake tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bot.web.app import create_app
from tests.conftest import make_settings


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str) -> Iterator[TestClient]:
    """The app on a migrated SQLite file with the in-process queue and worker."""
    settings = make_settings(tmp_path, db_url=sqlite_url)
    with TestClient(create_app(settings)) as c:
        c.db_url = sqlite_url  # type: ignore[attr-defined]
        yield c
