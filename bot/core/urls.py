"""URL pieces the settings and the git layer agree on (pure)."""

from __future__ import annotations

from urllib.parse import urlsplit


def host_of(url: str) -> str | None:
    """`host[:port]` in lower case of an http(s) URL, else None (paths, ssh, helpers)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower() + (f":{port}" if port is not None else "")
