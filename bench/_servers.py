"""ASGI factories for bench/intake.py, run by `uvicorn --factory bench._servers:<name>`.

Both live in the same module so the two servers import the same code and differ only in what
the endpoint does; the real app's settings come from DEKSDENFLOW_* in the environment.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_ACCEPTED = Response(b'{"status":"accepted"}', status_code=202, media_type="application/json")


async def _bare(request: Request) -> Response:
    # No body read, no HMAC, no storage: the ceiling the real app is compared with.
    return _ACCEPTED


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/webhooks/github", _bare, methods=["POST"])])


def real_app() -> Starlette:
    from bot.core.settings import Settings
    from bot.web.app import create_app

    return create_app(Settings(), embedded_worker=False)
