"""Sans-I/O webhook intake: (headers, raw body, secret) in, a verified delivery out, or an error."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from bot.errors import WebhookError

# Headers worth keeping with a delivery (for replay and the operator's view); never secrets.
_KEPT_HEADERS = (
    "x-github-event",
    "x-github-delivery",
    "x-github-hook-id",
    "x-github-hook-installation-target-id",
    "x-github-hook-installation-target-type",
    "x-gitlab-event",
    "x-gitlab-event-uuid",
    "x-gitlab-instance",
    "idempotency-key",
    "user-agent",
)


@dataclass(frozen=True)
class IncomingDelivery:
    """A verified, parsed delivery ready to be stored."""

    provider: str
    key: str
    event: str
    action: str | None
    body: str
    payload: dict[str, Any] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_ping(self) -> bool:
        return (self.provider == "github" and self.event == "ping") or (
            self.provider == "gitlab" and self.headers.get("x-gitlab-event", "").lower() == "test hook"
        )


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    low = _lower(headers)
    return {name: low[name] for name in _KEPT_HEADERS if name in low}


def verify_github_signature(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Check `X-Hub-Signature-256`; only sha256 is accepted (sha1 is too weak to trust)."""
    signature = headers.get("x-hub-signature-256") or _lower(headers).get("x-hub-signature-256")
    if not signature:
        raise WebhookError(401, "missing X-Hub-Signature-256 header")
    algo, _, digest = signature.partition("=")
    if algo != "sha256" or not digest:
        raise WebhookError(401, "X-Hub-Signature-256 must be sha256=<hex>")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, digest.strip().lower()):
        raise WebhookError(401, "signature does not match the body")


def verify_gitlab_token(headers: Mapping[str, str], secret: str) -> None:
    token = _lower(headers).get("x-gitlab-token")
    if not token:
        raise WebhookError(401, "missing X-Gitlab-Token header")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise WebhookError(401, "X-Gitlab-Token does not match")


def parse_json_object(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookError(400, f"body is not valid UTF-8 JSON: {exc}") from None
    try:
        # orjson is ~10x faster on the intake's hot path; the stdlib parser is the fallback for
        # what orjson refuses but JSON allows (integers beyond 64 bits)
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise WebhookError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, "body must be a JSON object")
    return text, payload


def _str_or_none(value: object) -> str | None:
    return value[:64] if isinstance(value, str) and value else None


def github_delivery(headers: Mapping[str, str], body: bytes, secret: str) -> IncomingDelivery:
    low = _lower(headers)
    verify_github_signature(low, body, secret)
    event = low.get("x-github-event", "").strip()
    key = low.get("x-github-delivery", "").strip()
    if not event:
        raise WebhookError(400, "missing X-GitHub-Event header")
    if not key:
        raise WebhookError(400, "missing X-GitHub-Delivery header")
    text, payload = parse_json_object(body)
    return IncomingDelivery(
        provider="github",
        key=key[:255],
        event=event[:64],
        action=_str_or_none(payload.get("action")),
        body=text,
        payload=payload,
        headers=kept_headers(low),
    )


def gitlab_action(payload: Mapping[str, Any]) -> str | None:
    attrs = payload.get("object_attributes")
    if isinstance(attrs, dict):
        return _str_or_none(attrs.get("action")) or _str_or_none(attrs.get("status"))
    return None


def gitlab_delivery(headers: Mapping[str, str], body: bytes, secret: str) -> IncomingDelivery:
    verify_gitlab_token(headers, secret)
    low = _lower(headers)
    event = low.get("x-gitlab-event", "").strip()
    if not event:
        raise WebhookError(400, "missing X-Gitlab-Event header")
    text, payload = parse_json_object(body)
    # Idempotency-Key survives GitLab's retries and manual resends; X-Gitlab-Webhook-UUID does
    # not, so without the key we fall back to the content itself.
    key = low.get("idempotency-key", "").strip()
    if not key:
        key = "sha256:" + hashlib.sha256(event.encode() + b"\n" + body).hexdigest()
    return IncomingDelivery(
        provider="gitlab",
        key=key[:255],
        event=event[:64],
        action=gitlab_action(payload),
        body=text,
        payload=payload,
        headers=kept_headers(headers),
    )
