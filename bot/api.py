"""Operator REST API under /api (grows with the operator-surface issue)."""

from __future__ import annotations

from starlette.routing import BaseRoute


def api_routes() -> list[BaseRoute]:
    return []
