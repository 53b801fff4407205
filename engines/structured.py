"""Lenient JSON extraction from an agent's final message (the caller validates the shape)."""

from __future__ import annotations

import json
import re
from typing import Any

# Models asked for JSON still sometimes wrap it in a markdown fence.
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\r?\n(.*?)\r?\n?```", re.DOTALL)


def parse_json_reply(text: str) -> tuple[Any | None, str | None]:
    """Return (value, None) when `text` holds one JSON document, else (None, reason)."""
    stripped = text.strip()
    if not stripped:
        return None, "the final message is empty"
    candidates = [stripped]
    candidates.extend(match.group(1).strip() for match in _FENCE.finditer(stripped))
    # Last resort: prose around a single object ("Here is the plan: {...}").
    first, last = stripped.find("{"), stripped.rfind("}")
    if 0 <= first < last:
        candidates.append(stripped[first : last + 1])
    first_error: str | None = None
    for candidate in candidates:
        try:
            return json.loads(candidate), None
        except ValueError as exc:
            first_error = first_error or f"the final message is not JSON: {exc}"
    return None, first_error
