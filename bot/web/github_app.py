"""GitHub App manifest flow: a page that submits app.yml to GitHub, and the code conversion."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.domain.doctor_results import is_loopback_host
from bot.forge.github import convert_manifest
from bot.storage import sessions
from bot.storage.app_credentials import store_credentials
from bot.web.api.core import guarded, require_admin

MANIFEST = Path(__file__).resolve().parents[2] / "app.yml"


def manifest_for(base_url: str) -> dict[str, Any]:
    """app.yml with this server's public URLs filled in (pure apart from reading the file)."""
    data: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    base = base_url.rstrip("/")
    data["hook_attributes"]["url"] = f"{base}/webhooks/github"
    data["redirect_url"] = f"{base}/github/setup/callback"
    return data


def loopback_warning(hook_url: str) -> str:
    """An HTML warning when GitHub could not reach the webhook URL (loopback), else ""."""
    from urllib.parse import urlsplit

    if not is_loopback_host(urlsplit(hook_url).hostname):
        return ""
    return (
        '<p class="warning" style="border: 2px solid #b00; padding: .5rem 1rem">'
        "<b>Warning:</b> the webhook URL would be "
        f"<code>{html.escape(hook_url)}</code>, a loopback "
        "address GitHub cannot reach: the App would get no events. Set "
        "<code>DEKSDENFLOW_PUBLIC_URL</code> to a public address, or for local development to a "
        "tunnel (smee.io, <code>gh webhook forward</code>, ngrok, cloudflared), restart, and open "
        "this page again.</p>"
    )


def setup_page(
    manifest: dict[str, Any], web_url: str, organization: str | None, state: str, warning: str = ""
) -> str:
    path = f"/organizations/{quote(organization, safe='')}" if organization else ""
    # GitHub hands `state` back on the redirect to the callback, which checks it once
    target = f"{web_url}{path}/settings/apps/new?{urlencode({'state': state})}"
    for_org = f" for the organisation <b>{html.escape(organization)}</b>" if organization else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>DeksdenFlow · create the GitHub App</title></head>
<body style="font-family: system-ui; max-width: 42rem; margin: 3rem auto">
<h1>Create the DeksdenFlow GitHub App</h1>
{warning}
<p>This sends the manifest below to GitHub{for_org}.
GitHub then returns here and the server stores the new App's id, key and webhook secret.</p>
<form action="{html.escape(target)}" method="post">
<input type="hidden" name="manifest" value="{html.escape(json.dumps(manifest))}">
<button type="submit">Create GitHub App</button>
</form>
<p>For an organisation, open <code>/github/setup?organization=NAME</code>.</p>
<pre>{html.escape(yaml.safe_dump(manifest, sort_keys=False))}</pre>
</body></html>"""


@guarded
async def github_setup(request: Request) -> Response:
    """The manifest page: operator token (or loopback without one); it mints a one-time state."""
    require_admin(request)
    state = request.app.state.df
    setup_state = await sessions.create(state.db, sessions.SETUP_STATE, sessions.SETUP_STATE_TTL_S)
    # DEKSDENFLOW_PUBLIC_URL wins: behind a proxy or tunnel the request's own URL is internal
    base = state.settings.public_url or str(request.base_url)
    manifest = manifest_for(base)
    page = setup_page(
        manifest,
        state.settings.github_web_url,
        request.query_params.get("organization"),
        setup_state,
        loopback_warning(manifest["hook_attributes"]["url"]),
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


async def github_setup_callback(request: Request) -> Response:
    """GitHub redirects the browser here with a one-hour `code` and the page's one-time `state`.

    The browser carries no API token here (a SameSite=Strict cookie does not follow a redirect
    from github.com), so the state is what proves the flow started on our own setup page.
    """

    state = request.app.state.df
    code = request.query_params.get("code", "")
    if not code or not code.replace("-", "").replace("_", "").isalnum():
        return JSONResponse({"error": "missing or malformed code"}, status_code=400)
    if not await sessions.consume(
        state.db, sessions.SETUP_STATE, request.query_params.get("state", "")
    ):
        return JSONResponse(
            {"error": "missing, used or expired state: start again from /github/setup"},
            status_code=403,
        )
    conversion = await convert_manifest(code, api_url=state.settings.github_api_url)
    kept = await store_credentials(state.settings, state.db, conversion)
    state.extra["github_webhook_secret"] = conversion.get("webhook_secret")
    state.extra["github_app"] = {"id": conversion.get("id"), "slug": conversion.get("slug")}
    if state.services is not None:
        state.services["forges"].use_app(kept)
    name = html.escape(str(conversion.get("slug") or conversion.get("id")))
    return HTMLResponse(
        f"<p>GitHub App <b>{name}</b> created and stored. Install it on your repositories next.</p>"
    )


def setup_routes() -> list[BaseRoute]:
    return [
        Route("/github/setup", github_setup),
        Route("/github/setup/callback", github_setup_callback),
    ]
