"""Records what every handled delivery was about, as an Event the operator can see."""

from __future__ import annotations

from typing import Any

from bot.handlers.router import HandlerContext, Router
from bot.storage.runs import record_event

router = Router()

GITHUB_EVENTS = (
    "issue_comment",
    "issues",
    "pull_request",
    "check_suite",
    "check_run",
    "workflow_run",
    "status",
    "pull_request_review",
    "pull_request_review_comment",
    "installation",
    "installation_repositories",
)
GITLAB_EVENTS = (
    "note hook",
    "issue hook",
    "merge request hook",
    "pipeline hook",
    "confidential note hook",
    "confidential issue hook",
)


def _get(payload: Any, *path: str) -> Any:
    """Walk nested dicts tolerating any shape: a missing key or a non-dict gives None."""
    for key in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload


def summarize(provider: str, event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A few identifying fields of a delivery; pure and safe on any payload shape."""
    if provider == "github":
        fields = {
            "repository": _get(payload, "repository", "full_name"),
            "sender": _get(payload, "sender", "login"),
            "installation": _get(payload, "installation", "id"),
            "number": _get(payload, "issue", "number") or _get(payload, "pull_request", "number"),
        }
    else:
        fields = {
            "project": _get(payload, "project", "path_with_namespace"),
            "user": _get(payload, "user", "username"),
            "kind": _get(payload, "object_kind"),
        }
    return {k: v for k, v in fields.items() if isinstance(v, str | int) and not isinstance(v, bool)}


async def record(ctx: HandlerContext) -> None:
    d = ctx.delivery
    meta = {
        "provider": d.provider,
        "event": d.event,
        "action": d.action,
        **summarize(d.provider, d.event, d.payload),
    }
    await record_event(
        ctx.services["db"],
        "delivery.received",
        f"{d.provider} {d.event}{'.' + d.action if d.action else ''}",
        delivery_id=ctx.delivery_id,
        metadata=meta,
    )
    ctx.note(handler="recorder", recorded=True)


for _event in GITHUB_EVENTS:
    router.register("github", _event)(record)
for _event in GITLAB_EVENTS:
    router.register("gitlab", _event)(record)
