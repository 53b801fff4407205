"""Sans-I/O webhook intake: (headers, raw body, secret) in, a verified delivery out, or an error."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgspec
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
    """A verified delivery whose body is a JSON object, ready to be stored."""

    provider: str
    key: str
    event: str
    action: str | None
    body: str
    headers: dict[str, str] = field(default_factory=dict)

    @cached_property
    def payload(self) -> dict[str, Any]:
        """The body as a dict, parsed on first use: the intake only checks it, handlers read it."""
        try:
            parsed = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            try:
                parsed = json.loads(self.body)  # integers beyond 64 bits, which orjson refuses
            except ValueError:
                return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def is_ping(self) -> bool:
        return (self.provider == "github" and self.event == "ping") or (
            self.provider == "gitlab" and self.headers.get("x-gitlab-event", "").lower() == "test hook"
        )


class LowerCaseHeaders(dict[str, str]):
    """Headers whose names are already lower-case (ASGI gives them so): not copied again."""


def _lower(headers: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(headers, LowerCaseHeaders):
        return headers
    return {k.lower(): v for k, v in headers.items()}


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
    token = headers.get("x-gitlab-token") or _lower(headers).get("x-gitlab-token")
    if not token:
        raise WebhookError(401, "missing X-Gitlab-Token header")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise WebhookError(401, "X-Gitlab-Token does not match")


class _GitHubFields(msgspec.Struct):
    action: Any = None


class _GitLabFields(msgspec.Struct):
    object_attributes: Any = None


# The intake needs a well-formed JSON object and one or two fields of it, not the whole tree:
# decoding into these structs checks the entire document but builds only those fields
# (about a quarter of a full parse for a typical delivery).
_GITHUB_DECODER = msgspec.json.Decoder(_GitHubFields)
_GITLAB_DECODER = msgspec.json.Decoder(_GitLabFields)


def check_json_object(body: bytes, decoder: msgspec.json.Decoder[Any]) -> tuple[str, Any]:
    """(body as text, the decoder's fields) or a 400 that says what is wrong with the body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookError(400, f"body is not valid UTF-8 JSON: {exc}") from None
    try:
        return text, decoder.decode(body)
    except msgspec.MsgspecError:
        pass
    # The fast decoder refused it; the stdlib parser has the last word (it also takes what JSON
    # allows and msgspec does not, like 1e400) and gives the clearer message.
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise WebhookError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, "body must be a JSON object")
    return text, msgspec.convert(
        {k: payload.get(k) for k in decoder.type.__struct_fields__}, decoder.type
    )


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
    text, fields = check_json_object(body, _GITHUB_DECODER)
    return IncomingDelivery(
        provider="github",
        key=key[:255],
        event=event[:64],
        action=_str_or_none(fields.action),
        body=text,
        headers={name: low[name] for name in _KEPT_HEADERS if name in low},
    )


def gitlab_action(payload: Mapping[str, Any]) -> str | None:
    attrs = payload.get("object_attributes")
    if isinstance(attrs, dict):
        return _str_or_none(attrs.get("action")) or _str_or_none(attrs.get("status"))
    return None


def gitlab_delivery(headers: Mapping[str, str], body: bytes, secret: str) -> IncomingDelivery:
    low = _lower(headers)
    verify_gitlab_token(low, secret)
    event = low.get("x-gitlab-event", "").strip()
    if not event:
        raise WebhookError(400, "missing X-Gitlab-Event header")
    text, fields = check_json_object(body, _GITLAB_DECODER)
    # Idempotency-Key survives GitLab's retries and manual resends; X-Gitlab-Webhook-UUID does
    # not, so without the key we fall back to the content itself.
    key = low.get("idempotency-key", "").strip()
    if not key:
        key = "sha256:" + hashlib.sha256(event.encode() + b"\n" + body).hexdigest()
    return IncomingDelivery(
        provider="gitlab",
        key=key[:255],
        event=event[:64],
        action=gitlab_action({"object_attributes": fields.object_attributes}),
        body=text,
        headers={name: low[name] for name in _KEPT_HEADERS if name in low},
    )
