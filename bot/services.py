"""Long-lived clients shared by jobs and handlers, built once per worker process into ctx."""

from __future__ import annotations

from typing import Any


async def build_services(ctx: dict[str, Any]) -> None:
    del ctx


async def close_services(ctx: dict[str, Any]) -> None:
    del ctx
