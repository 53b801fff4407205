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

from bot.core import jsoncodec
from bot.core.errors import WebhookError
from bot.core.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.forge.kinds import forge_kind

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
    # what the delivery is about (see `github_semantic_key`): a replay under a new delivery id
    # carries the same one, and the store refuses it as a duplicate
    semantic_key: str | None = None

    @cached_property
    def payload(self) -> dict[str, Any]:
        """The body as a dict, parsed on first use: the intake only checks it, handlers read it."""
        try:
            # exact integers beyond 64 bits (orjson would read them as floats)
            parsed = jsoncodec.loads(self.body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def is_ping(self) -> bool:
        """A forge testing its hook (GitHub's `ping`, GitLab's `Test Hook`): answered, not kept."""
        kind = forge_kind(self.provider)
        return kind is not None and kind.ping_event == self.event.lower()


class LowerCaseHeaders(dict[str, str]):
    """Headers whose names are already lower-case (ASGI gives them so): not copied again."""


def _lower(headers: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(headers, LowerCaseHeaders):
        return headers
    return {k.lower(): v for k, v in headers.items()}


# An HMAC keyed with each secret seen, copied per delivery: keying hashes the padded key
# (two SHA-256 blocks, plus building the object), about a tenth of a 4 KB delivery's check.
# A few entries at most (the configured secret, one stored by the manifest flow).
_KEYED: dict[str, hmac.HMAC] = {}


def _keyed_sha256(secret: str) -> hmac.HMAC:
    keyed = _KEYED.get(secret)
    if keyed is None:
        if len(_KEYED) >= 4:  # secrets were rotated: forget the old ones
            _KEYED.clear()
        keyed = _KEYED[secret] = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    return keyed.copy()


def verify_github_signature(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Check `X-Hub-Signature-256`; only sha256 is accepted (sha1 is too weak to trust)."""
    signature = headers.get("x-hub-signature-256") or _lower(headers).get("x-hub-signature-256")
    if not signature:
        raise WebhookError(401, "missing X-Hub-Signature-256 header")
    algo, _, digest = signature.partition("=")
    if algo != "sha256" or not digest:
        raise WebhookError(401, "X-Hub-Signature-256 must be sha256=<hex>")
    mac = _keyed_sha256(secret)
    mac.update(body)
    if not hmac.compare_digest(mac.hexdigest(), digest.strip().lower()):
        raise WebhookError(401, "signature does not match the body")


def verify_gitlab_token(headers: Mapping[str, str], secret: str) -> None:
    token = headers.get("x-gitlab-token") or _lower(headers).get("x-gitlab-token")
    if not token:
        raise WebhookError(401, "missing X-Gitlab-Token header")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise WebhookError(401, "X-Gitlab-Token does not match")


class _Ref(msgspec.Struct):
    """The few scalars of a nested object that identify one version of it."""

    sha: Any = None


class _Object(msgspec.Struct):
    id: Any = None
    updated_at: Any = None
    created_at: Any = None
    finished_at: Any = None
    action: Any = None
    status: Any = None
    name: Any = None
    run_attempt: Any = None
    head_sha: Any = None
    sha: Any = None  # GitLab pipelines
    head: _Ref | None = None


class _GitHubFields(msgspec.Struct):
    action: Any = None
    id: Any = None  # `status` events are their own object
    updated_at: Any = None
    comment: _Object | None = None
    issue: _Object | None = None
    pull_request: _Object | None = None
    check_suite: _Object | None = None
    workflow_run: _Object | None = None
    review: _Object | None = None
    label: _Object | None = None


class _GitLabUser(msgspec.Struct):
    id: Any = None


class _GitLabFields(msgspec.Struct):
    object_attributes: _Object | None = None
    user: _GitLabUser | None = None


# The intake needs a well-formed JSON object and a few fields of it, not the whole tree:
# decoding into these structs checks the entire document but builds only those fields
# (about a quarter of a full parse for a typical delivery).
_GITHUB_DECODER = msgspec.json.Decoder(_GitHubFields)
_GITLAB_DECODER = msgspec.json.Decoder(_GitLabFields)

# Which object a GitHub event is about. Events not listed (installation, check_run, …) have no
# semantic key: a check_run `requested_action` carries nothing that tells two clicks on the same
# button apart, so only the delivery id dedupes it.
_GITHUB_SUBJECT = {
    "issue_comment": "comment",
    "issues": "issue",
    "pull_request": "pull_request",
    "pull_request_review": "review",
    "pull_request_review_comment": "comment",
    "check_suite": "check_suite",
    "workflow_run": "workflow_run",
}


def _scalar(value: Any) -> str:
    """An id or stamp as text; "" for what is none (None, booleans, objects, lists)."""
    if value.__class__ is str:  # the usual stamp, checked first: this runs 7 times a delivery
        return value
    if value is None or value is True or value is False:
        return ""
    if isinstance(value, int | str):
        return str(value)
    return ""


def _key(parts: list[Any]) -> str | None:
    """`a:b:c` when the identifying parts are there; None when the id or the stamp is missing."""
    text = list(map(_scalar, parts))
    if not text[2] or not text[3]:  # object id and its timestamp
        return None
    return ":".join(text)[:255]


def github_semantic_key(event: str, fields: _GitHubFields) -> str | None:
    """event:action:object id:updated_at[:label][:head sha][:attempt] — one version of one object.

    The signature covers the body but not `X-GitHub-Delivery`, so a captured delivery could be
    replayed under a new id; this key (in the body, hence signed) makes it a duplicate. Edits,
    new pushes and re-runs change `updated_at`, the head sha or the attempt, so they still count.
    """
    if event == "status":
        return _key([event, "", fields.id, fields.updated_at])
    attr = _GITHUB_SUBJECT.get(event)
    obj: _Object | None = getattr(fields, attr) if attr else None
    if obj is None:
        return None
    sha = obj.head_sha or (obj.head.sha if obj.head is not None else None)
    label = fields.label.name if fields.label is not None else None
    return _key([event, fields.action, obj.id, obj.updated_at, label, sha, obj.run_attempt])


def gitlab_semantic_key(event: str, fields: _GitLabFields) -> str | None:
    """event:action|status:object id:updated_at[:sha] (pipelines: finished_at or created_at)."""
    attrs = fields.object_attributes
    if attrs is None:
        return None
    stamp = attrs.updated_at or attrs.finished_at or attrs.created_at
    # two people approving the same MR version are two events: the approver tells them apart
    approver = fields.user.id if attrs.action in _APPROVALS and fields.user is not None else None
    return _key([event.lower(), attrs.action or attrs.status, attrs.id, stamp, attrs.sha, approver])


_APPROVALS = frozenset({"approved", "unapproved", "approval", "unapproval"})


def check_json_object(body: bytes, decoder: msgspec.json.Decoder[Any]) -> tuple[str, Any]:
    """(body as text, the decoder's fields) or a 400 that says what is wrong with the body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookError(400, f"body is not valid UTF-8 JSON: {exc}") from None
    if too_deep(body):
        raise WebhookError(400, f"body nests deeper than {MAX_JSON_DEPTH} levels")
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
    # a field of another shape than ours (say, `comment` as a string) is just not there
    fields: dict[str, Any] = {}
    for name in decoder.type.__struct_fields__:
        try:
            fields[name] = getattr(msgspec.convert({name: payload.get(name)}, decoder.type), name)
        except msgspec.MsgspecError:
            pass
    return text, decoder.type(**fields)


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
        semantic_key=github_semantic_key(event, fields),
    )


def gitlab_action(payload: Mapping[str, Any]) -> str | None:
    attrs = payload.get("object_attributes")
    if isinstance(attrs, dict):
        return _str_or_none(attrs.get("action")) or _str_or_none(attrs.get("status"))
    return None


def _gitlab_fields_action(fields: _GitLabFields) -> str | None:
    attrs = fields.object_attributes
    if attrs is None:
        return None
    return _str_or_none(attrs.action) or _str_or_none(attrs.status)


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
        action=_gitlab_fields_action(fields),
        body=text,
        headers={name: low[name] for name in _KEPT_HEADERS if name in low},
        semantic_key=gitlab_semantic_key(event, fields),
    )
