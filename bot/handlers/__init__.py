"""Webhook handlers: one module per concern, combined into one router here."""

from __future__ import annotations

from bot.handlers import comments, lifecycle, recorder
from bot.handlers.router import Router


def build_router() -> Router:
    return Router(recorder.router, comments.router, lifecycle.router)
