"""The webhook edge: `POST /webhooks/{github,gitlab,ci}` as plain ASGI.

Every delivery of every repository comes through here, so this is the one hot path of the
service. Starlette's Request/Response objects and its middleware layers cost about as much
CPU as verifying, parsing and durably storing a delivery, so these two routes skip them:
headers come from the ASGI scope, the body from `receive`, the answer is two `send` calls.
Everything else (API, console, health, other methods on these paths) stays on starlette.
The rules are the same as anywhere else: verify before storing, answer `accepted` only for a
delivery that is on disk, and a clear 4xx/503 instead of a 5xx for anything the forge sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from bot.core.errors import WebhookError
from bot.core.observability import log_context
from bot.handlers.ci_report import ci_delivery
from bot.handlers.sansio import IncomingDelivery, LowerCaseHeaders, github_delivery, gitlab_delivery

if TYPE_CHECKING:
    from bot.web.app import AppState

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Parser = Callable[[dict[str, str], bytes, str], IncomingDelivery]


class ClientGone(Exception):
    """The forge hung up before the body was complete: nothing to store, nobody to answer."""


def header_dict(scope: Scope) -> LowerCaseHeaders:
    """ASGI headers (lower-cased byte pairs) as a str dict.

    A repeated header keeps its last value.
    """
    return LowerCaseHeaders(
        {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    )


async def read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit`: never buffer a huge upload."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise WebhookError(400, "invalid Content-Length") from None
        if too_big:
            raise WebhookError(413, f"body larger than {limit} bytes")
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message carries it all
        if len(body) > limit:
            raise WebhookError(413, f"body larger than {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise WebhookError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def answer(send: Send, status: int, content: dict[str, Any]) -> None:
    body = orjson.dumps(content)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def ci_secret(state: AppState) -> str | None:
    """The CI hook's bearer token."""
    token = state.settings.webhook_token
    return token.get_secret_value() if token else None


def github_secret(state: AppState) -> str | None:
    """The GitHub App's webhook secret: the manifest flow (`/setup/github`) stores it at
    runtime, over the configured one."""
    stored: str | None = state.extra.get("github_webhook_secret")
    if stored:
        return stored
    configured = state.settings.github_webhook_secret
    return configured.get_secret_value() if configured else None


def gitlab_secret(state: AppState) -> str | None:
    """The token GitLab's hooks send."""
    configured = state.settings.gitlab_webhook_secret
    return configured.get_secret_value() if configured else None


class WebhookEdge:
    """Receives deliveries for one provider and hands them to the durable store."""

    def __init__(
        self,
        state: AppState,
        provider: str,
        secret_env: str,
        parse: Parser,
        secret: Callable[[AppState], str | None],
    ) -> None:
        self.state = state
        self.provider = provider
        self.secret_env = secret_env
        self.parse = parse
        self._secret = secret

    def secret(self) -> str | None:
        """Read on every delivery: settings reload and the manifest flow may change it."""
        return self._secret(self.state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, content = await self.receive_delivery(scope, receive)
        except ClientGone:
            return
        except Exception:  # a bug here must still answer, never hang the forge's request
            log.exception("%s webhook intake failed", self.provider)
            status, content = (
                500,
                {"error": "internal error; the delivery was not stored, please redeliver"},
            )
        await answer(send, status, content)

    async def receive_delivery(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        state = self.state
        secret = self.secret()
        if not secret:
            # Never accept unsigned deliveries: an unset secret is an operator error, not "open".
            return 503, {
                "error": f"{self.provider} webhooks are not configured: set {self.secret_env}"
            }
        headers = header_dict(scope)
        try:
            body = await read_body(headers, receive, state.settings.max_body_bytes)
            delivery = self.parse(headers, body, secret)
        except WebhookError as exc:
            state.metrics.count_delivery(self.provider, "-", f"rejected_{exc.status_code}")
            return exc.status_code, {"error": exc.message}
        if delivery.is_ping:
            state.metrics.count_delivery(self.provider, delivery.event, "ping")
            return 200, {"delivery": delivery.key, "status": "pong"}
        handled = state.handles(self.provider, delivery.event)
        assert state.store is not None
        try:
            # bounded by the store's deadline (TimeoutError): a database that hangs gives the
            # forge a 503 well within its 10 s
            outcome, delivery_id = await state.store.store(
                delivery, "pending" if handled else "ignored"
            )
        except Exception:
            with log_context(delivery_key=delivery.key):
                log.exception("could not store %s delivery", self.provider)
            return 503, {"error": "could not store the delivery; please redeliver"}
        status = outcome if (outcome == "duplicate" or handled) else "ignored"
        state.metrics.count_delivery(self.provider, delivery.event, status)
        state.metrics.observe_intake(self.provider, time.perf_counter() - started)
        content = {
            "delivery": delivery.key,
            "status": status,
            "id": delivery_id,
            "event": delivery.event,
        }
        return (200 if status == "duplicate" else 202), content


def webhook_edges(state: AppState) -> dict[str, WebhookEdge]:
    """The fast-path handlers by path (with and without a trailing slash)."""
    github = WebhookEdge(
        state, "github", "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET", github_delivery, github_secret
    )
    gitlab = WebhookEdge(
        state, "gitlab", "DEKSDENFLOW_GITLAB_WEBHOOK_SECRET", gitlab_delivery, gitlab_secret
    )
    ci = WebhookEdge(state, "ci", "DEKSDENFLOW_WEBHOOK_TOKEN", ci_delivery, ci_secret)
    return {
        "/webhooks/ci": ci,
        "/webhooks/ci/": ci,
        "/webhooks/github": github,
        "/webhooks/github/": github,
        "/webhooks/gitlab": gitlab,
        "/webhooks/gitlab/": gitlab,
    }
