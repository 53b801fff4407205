"""Pure security rules at the door: who counts as loopback, valid ref names and git URLs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

# Headers a proxy (or anyone pretending to be one) uses to say who the "real" client is.
FORWARDING_HEADERS = (
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-client-ip",
)
MIN_REMOTE_TOKEN_LENGTH = 32
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \ anywhere in a ref name
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# a path segment of a forge repository (owner, group, repository name)
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# `<transport>::<address>` runs a remote helper (ext:: runs any command); never a plain URL
_HELPER = re.compile(r"^[A-Za-z0-9+.-]*::")
_SCP_LIKE = re.compile(r"^[^/:]+:(?!//)")


def is_loopback(host: str | None) -> bool:
    """True for a socket peer on 127.0.0.0/8 or ::1 (names never count: they are not peers)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def forwarded(headers: Mapping[str, str]) -> bool:
    """True when the request carries any forwarding header (it came through some proxy)."""
    return any(name in headers for name in FORWARDING_HEADERS)


def token_problem(token: str | None, host: str) -> str | None:
    """Why `serve` must not start with this API token on this bind address, or None."""
    if token is not None and len(token) < MIN_REMOTE_TOKEN_LENGTH and not is_loopback_bind(host):
        return (
            f"DEKSDENFLOW_API_TOKEN must be at least {MIN_REMOTE_TOKEN_LENGTH} characters "
            "when serve listens beyond loopback"
        )
    return None


def is_loopback_bind(host: str) -> bool:
    """A bind address reachable from this machine only (`localhost` is a name we resolve
    ourselves)."""
    return host == "localhost" or is_loopback(host)


def ref_name_problem(name: str) -> str | None:
    """Why `name` is not a valid branch name (`git check-ref-format --branch` rules), or None.

    Also refused: a leading `-`, so the name can never be read as an option by git.
    """
    if not name:
        return "must not be empty"
    if name.startswith("-"):
        return "must not start with '-'"
    if name in ("@", "HEAD"):
        return f"{name!r} is not a branch name"
    if _REF_FORBIDDEN.search(name):
        return "must not contain spaces, control characters or any of ~ ^ : ? * [ \\"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "must not start or end with '/' or contain '//'"
    if ".." in name or "@{" in name:
        return "must not contain '..' or '@{'"
    if name.endswith("."):
        return "must not end with '.'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "no path component may start with '.' or end with '.lock'"
    return None


@dataclass(frozen=True)
class RepoUrlRule:
    """How one kind of forge names a repository in a project's git_url (bot/forge/kinds.py
    holds each forge's rule: the domain never asks which forge it is)."""

    forge: str  # the forge's name, for messages
    path: bool = False  # a filesystem path (a plain checkout), never a URL
    depth: int | None = None  # path segments naming a repository exactly; None: 2 or more


def git_url_problem(url: str, rule: RepoUrlRule, forge_url: str | None) -> str | None:
    """Why `url` is not acceptable as a project's git_url, or None.

    A forge's project: an http(s) URL on the configured forge's own host and port, without
    credentials, query or fragment, whose path names a repository (`rule.depth` segments, or
    2 or more where groups nest). That one rule keeps the forge's token on the forge (the git
    layer checks again per command), and leaves no room for file://, other hosts or private
    addresses. A plain checkout's project (`rule.path`): a filesystem path.
    """
    if problem := _plain_text_problem(url):
        return problem
    if rule.path:
        return _local_path_problem(url)
    if forge_url is None:
        return f"no {rule.forge} host is configured"
    return _forge_url_problem(url, rule, forge_url)


def _plain_text_problem(url: str) -> str | None:
    """What any git_url must be: no spaces or control characters, never an option for git,
    never a remote helper."""
    if not url or url != url.strip() or any(ord(c) < 0x20 or c == "\x7f" for c in url):
        return "must be a plain URL or path without spaces or control characters"
    if url.startswith("-"):
        return "must not start with '-'"
    if _HELPER.match(url):
        return "remote helpers (`transport::address`, e.g. ext::) are not allowed"
    return None


def _local_path_problem(url: str) -> str | None:
    """A plain checkout's git_url is a path: no scheme, no scp-like `host:path`."""
    if "://" in url or _SCP_LIKE.match(url):
        return "a local project's git_url is a filesystem path, not a URL"
    return None


def _forge_url_problem(url: str, rule: RepoUrlRule, forge_url: str) -> str | None:
    """A forge project's git_url: on the forge's origin, then a repository's path under it."""
    try:
        parts, forge = urlsplit(url), urlsplit(forge_url)
        port, forge_port = parts.port, forge.port  # raise ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    return _address_problem(parts, port, forge, forge_port) or _repository_path_problem(
        parts.path, forge.path, forge_url, rule.depth
    )


def _address_problem(
    parts: SplitResult, port: int | None, forge: SplitResult, forge_port: int | None
) -> str | None:
    """Same scheme, host and port as the forge; no credentials, query, fragment or escapes."""
    if parts.scheme != forge.scheme or (parts.hostname or "") != (forge.hostname or "").lower():
        return f"must be a {forge.scheme}:// URL on {forge.hostname}"
    if port != forge_port:
        return f"must use the port of {forge.netloc}"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if parts.query or parts.fragment or "%" in parts.path:
        return "must not contain a query, fragment or escapes"
    return None


def _repository_path_problem(
    path: str, base_path: str, forge_url: str, depth: int | None
) -> str | None:
    """The path is the forge's own base path, then a repository: `depth` valid segments (2 or
    more when depth is None), an optional trailing .git aside."""
    segments = path.strip("/").removesuffix(".git").split("/")
    base_segments = [s for s in base_path.strip("/").split("/") if s]
    if segments[: len(base_segments)] != base_segments:
        return f"must be under {forge_url}"
    segments = segments[len(base_segments) :]
    if len(segments) < 2 or (depth is not None and len(segments) != depth):
        return "must name a repository (owner/name)"
    if not all(_SEGMENT.match(s) for s in segments):
        return "has an invalid owner or repository name"
    return None


def same_repository_url(a: str, b: str) -> bool:
    """Two clone URLs of one repository (case of the host, a trailing .git and / aside)."""

    def norm(url: str) -> tuple[str, str, str]:
        p = urlsplit(url)
        return p.scheme, p.netloc.lower(), p.path.rstrip("/").removesuffix(".git").lower()

    try:
        return norm(a) == norm(b)
    except ValueError:
        return False
