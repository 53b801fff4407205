"""Routers map (provider, event, action) to handlers; one router per handler module."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bot.handlers.sansio import IncomingDelivery


@dataclass
class HandlerContext:
    """What a handler may use: plain values plus the worker's shared clients (ctx)."""

    delivery_id: int
    delivery: IncomingDelivery
    services: dict[str, Any]
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    def note(self, **outcome: Any) -> None:
        """Record what a handler decided; stored on the delivery's `outcome`."""
        self.outcomes.append(outcome)


Handler = Callable[[HandlerContext], Awaitable[None]]
_Key = tuple[str, str, str | None]


class Router:
    """Handlers registered by event and optional action; no ordering between handlers."""

    def __init__(self, *others: Router) -> None:
        self._handlers: dict[_Key, list[Handler]] = {}
        for other in others:
            for key, handlers in other._handlers.items():
                self._handlers.setdefault(key, []).extend(handlers)

    def register(self, provider: str, event: str, *actions: str) -> Callable[[Handler], Handler]:
        def decorator(func: Handler) -> Handler:
            for action in actions or (None,):
                self._handlers.setdefault((provider, event.lower(), action), []).append(func)
            return func

        return decorator

    def handlers_for(self, provider: str, event: str, action: str | None) -> list[Handler]:
        event = event.lower()
        found = list(self._handlers.get((provider, event, None), []))
        if action is not None:
            found += self._handlers.get((provider, event, action), [])
        return found

    def handles(self, provider: str, event: str) -> bool:
        event = event.lower()
        return any(p == provider and e == event for p, e, _ in self._handlers)

    def events(self) -> Iterable[tuple[str, str]]:
        return sorted({(p, e) for p, e, _ in self._handlers})
