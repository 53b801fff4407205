"""Every webhook handler module's router, combined into the one the app and the workers use."""

from __future__ import annotations

from bot.handlers.comments import router as comments
from bot.handlers.lifecycle import router as lifecycle
from bot.handlers.recorder import router as recorder
from bot.handlers.reviews import router as reviews
from bot.handlers.router import Router


def build_router() -> Router:
    return Router(recorder, comments, lifecycle, reviews)
