"""/github/setup warns when the webhook URL would be loopback, and takes DEKSDENFLOW_PUBLIC_URL."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bot.web.app import create_app
from bot.web.github_app import loopback_warning
from tests.conftest import make_settings

AUTH = {"Authorization": "Bearer api-test-token-0123456789"}


def manifest_of(page: str) -> dict[str, object]:
    value = page.split('name="manifest" value="', 1)[1].split('"', 1)[0]
    data: dict[str, object] = json.loads(html.unescape(value))
    return data


@pytest.mark.parametrize(
    "url,warns",
    [
        ("http://127.0.0.1:8000/webhooks/github", True),
        ("http://localhost:8000/webhooks/github", True),
        ("http://[::1]:8000/webhooks/github", True),
        ("https://bot.example.com/webhooks/github", False),
        ("https://abc.smee.io/webhooks/github", False),
    ],
)
def test_loopback_warning(url: str, warns: bool) -> None:
    text = loopback_warning(url)
    assert bool(text) is warns
    if warns:
        assert "smee.io" in text and "DEKSDENFLOW_PUBLIC_URL" in text


def test_setup_page_opened_locally_warns(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        page = client.get("/github/setup", headers=AUTH)
    assert page.status_code == 200
    assert "<b>Warning:</b>" in page.text and "http://127.0.0.1:8000/webhooks/github" in page.text


def test_setup_page_uses_the_public_url(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, public_url="https://bot.example.com/"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        page = client.get("/github/setup", headers=AUTH)
    assert "<b>Warning:</b>" not in page.text
    manifest = manifest_of(page.text)
    assert manifest["hook_attributes"] == {
        "url": "https://bot.example.com/webhooks/github",
        "active": True,
    }
    assert manifest["redirect_url"] == "https://bot.example.com/github/setup/callback"
