"""Where git may carry the forge's credentials: the configured forge hosts, over http(s), only."""

from __future__ import annotations

from collections.abc import Collection

from bot.core.urls import host_of


def may_send_credentials(url: str, allowed_hosts: Collection[str]) -> bool:
    """True when an auth header may travel with a request to `url`.

    Checked per git command, where the header is attached, so that no project row (a changed
    git_url, a stale mirror) can route the installation token to another host.
    """
    host = host_of(url)
    return host is not None and host in {h.lower() for h in allowed_hosts}


def is_network_url(url: str) -> bool:
    """A URL git would reach over the network (http, ssh, git, scp-like), not a local path."""
    if "://" in url:
        return not url.lower().startswith("file://")
    head, sep, _ = url.partition(":")
    return bool(sep) and "/" not in head and len(head) > 1
