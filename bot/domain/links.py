"""Where people find things: console URLs under DEKSDENFLOW_PUBLIC_URL (pure; None without it)."""

from __future__ import annotations


def protocol_page(public_url: str | None, run_id: int) -> str | None:
    """The protocol run's console page, or None when no public URL is configured."""
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/console/protocols/{run_id}"


def step_page(public_url: str | None, run_id: int, step_index: int) -> str | None:
    """One step's console page (transcript, diff, cost), or None without a public URL."""
    base = protocol_page(public_url, run_id)
    return f"{base}/steps/{step_index}" if base else None
