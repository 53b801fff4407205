"""The protocol and forge jobs the worker runs, beside process_delivery."""

from __future__ import annotations

from typing import Any

from bot.settings import Settings


def protocol_functions(settings: Settings) -> list[Any]:
    del settings
    return []
