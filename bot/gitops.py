"""The git layer's public API (implemented in bot.git); jobs import from here."""

from bot.git import *  # noqa: F403
from bot.git import __all__ as __all__
