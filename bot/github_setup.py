"""GitHub App manifest flow: a page that submits app.yml to GitHub, and the code conversion."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.api import guarded
from bot.fsperm import ensure_private_dir

MANIFEST = Path(__file__).resolve().parent.parent / "app.yml"
CREDENTIALS_FILE = "github-app.json"


def manifest_for(base_url: str) -> dict[str, Any]:
    """app.yml with this server's public URLs filled in (pure apart from reading the file)."""
    data: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    base = base_url.rstrip("/")
    data["hook_attributes"]["url"] = f"{base}/webhooks/github"
    data["redirect_url"] = f"{base}/github/setup/callback"
    return data


def setup_page(manifest: dict[str, Any], web_url: str, organization: str | None) -> str:
    target = (
        f"{web_url}/organizations/{organization}/settings/apps/new"
        if organization
        else f"{web_url}/settings/apps/new"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>DeksdenFlow · create the GitHub App</title></head>
<body style="font-family: system-ui; max-width: 42rem; margin: 3rem auto">
<h1>Create the DeksdenFlow GitHub App</h1>
<p>This sends the manifest below to GitHub{" for the organisation <b>" + html.escape(organization) + "</b>" if organization else ""}.
GitHub then returns here and the server stores the new App's id, key and webhook secret.</p>
<form action="{html.escape(target)}" method="post">
<input type="hidden" name="manifest" value="{html.escape(json.dumps(manifest))}">
<button type="submit">Create GitHub App</button>
</form>
<p>For an organisation, open <code>/github/setup?organization=NAME</code>.</p>
<pre>{html.escape(yaml.safe_dump(manifest, sort_keys=False))}</pre>
</body></html>"""


def store_credentials(data_dir: Path, conversion: dict[str, Any]) -> Path:
    """Keep what the server needs; the file is readable by the service user only."""
    ensure_private_dir(data_dir)
    path = data_dir / CREDENTIALS_FILE
    kept = {
        k: conversion.get(k)
        for k in ("id", "slug", "pem", "webhook_secret", "client_id", "html_url")
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(kept, fh)
    os.chmod(path, 0o600)  # O_CREAT's mode applies to new files only
    return path


def load_credentials(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@guarded
async def github_setup(request: Request) -> Response:
    state = request.app.state.df
    base = str(request.base_url)
    page = setup_page(
        manifest_for(base), state.settings.github_web_url, request.query_params.get("organization")
    )
    return HTMLResponse(page)


async def github_setup_callback(request: Request) -> Response:
    """GitHub redirects the browser here with a one-hour `code` (no API token: it is the user's browser)."""
    from bot.forge.github import convert_manifest

    state = request.app.state.df
    code = request.query_params.get("code", "")
    if not code or not code.replace("-", "").replace("_", "").isalnum():
        return JSONResponse({"error": "missing or malformed code"}, status_code=400)
    conversion = await convert_manifest(code, api_url=state.settings.github_api_url)
    store_credentials(state.settings.data_dir, conversion)
    state.extra["github_webhook_secret"] = conversion.get("webhook_secret")
    state.extra["github_app"] = {"id": conversion.get("id"), "slug": conversion.get("slug")}
    name = html.escape(str(conversion.get("slug") or conversion.get("id")))
    return HTMLResponse(
        f"<p>GitHub App <b>{name}</b> created and stored. Install it on your repositories next.</p>"
    )


def setup_routes() -> list[BaseRoute]:
    return [
        Route("/github/setup", github_setup),
        Route("/github/setup/callback", github_setup_callback),
    ]
