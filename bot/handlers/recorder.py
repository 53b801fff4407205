"""Records what every handled delivery was about, as an Event the operator can see."""

from __future__ import annotations

from typing import Any

from bot.forge.kinds import KINDS, forge_kind
from bot.handlers.router import HandlerContext, Router
from bot.storage.runs import record_event

router = Router()


def _get(payload: Any, *path: str) -> Any:
    """Walk nested dicts tolerating any shape: a missing key or a non-dict gives None."""
    for key in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload


def summarize(provider: str, event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A few identifying fields of a delivery (the forge kind's `summary` says which); pure and
    safe on any payload shape."""
    kind = forge_kind(provider)
    fields: dict[str, Any] = {}
    for name, paths in kind.summary if kind is not None else ():
        for path in paths:
            value = _get(payload, *path)
            if isinstance(value, str | int) and not isinstance(value, bool):
                fields[name] = value
                break
    return fields


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


for _kind in KINDS.values():
    for _event in _kind.recorded_events:
        router.register(_kind.name, _event)(record)
