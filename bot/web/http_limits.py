"""How `serve` runs uvicorn: request deadlines and a connection cap (issue 20, point 15).

uvicorn has no header-read or body-read deadline: its keep-alive timer is cancelled by every
byte that arrives, so a client trickling one byte every few seconds holds a connection (and a
file descriptor) forever. This h11 protocol gives each request `header_timeout_s` to deliver
its headers (from the connection's start, or the end of the previous response) and then
`body_timeout_s` for its body; past either, the connection is closed (the app, if it was
reading the body, sees a disconnect). `--limit-concurrency` answers 503 past a number of
open connections.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bot.core.settings import Settings


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request headers and one for the body."""

    header_timeout_s = 10.0
    body_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_cycle: object | None = None
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._timed_cycle:
            self._timed_cycle = self.cycle  # headers complete: the body's clock starts
            self._arm(self.body_timeout_s)
        if self._timed_cycle is not None and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is all in; the app answers in its own time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s)  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # Waiting for headers (IDLE) or in the middle of a body: too slow, drop it. A request
        # that is complete (DONE) is the app's to answer.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.transport.close()


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineH11Protocol]:
    return type(
        "ConfiguredDeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )


def limit_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run/Config keywords for request deadlines and the connection cap."""
    return {
        "http": deadline_protocol(settings.header_timeout_s, settings.body_timeout_s),
        "limit_concurrency": settings.limit_concurrency or None,
        "timeout_keep_alive": 5,
    }
