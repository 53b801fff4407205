"""Webhook handlers: one module per concern, combined into one router here."""

from __future__ import annotations

from bot.handlers.router import Router


def build_router() -> Router:
    from bot.handlers.comments import router as comments
    from bot.handlers.lifecycle import router as lifecycle
    from bot.handlers.recorder import router as recorder
    from bot.handlers.reviews import router as reviews

    return Router(recorder, comments, lifecycle, reviews)
