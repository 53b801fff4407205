"""Pure naming rules: protocol names and numbers, branch checks, cache directory names."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from urllib.parse import urlsplit

from bot.core.errors import GitError

SLUG_MAX = 40
_PROTOCOL = re.compile(r"^(\d{4,})-[A-Za-z0-9]")
_SCP_LIKE = re.compile(r"^[^/:]+:(?!//)")
# A conservative subset of `git check-ref-format --branch`: we build paths and command lines from
# these names, so anything that could be read as an option or escape a directory is refused.
_BRANCH_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")


def parse_protocol_number(name: str) -> int | None:
    """`0007-fix-login` -> 7; anything that is not `NNNN-task` -> None."""
    m = _PROTOCOL.match(name)
    return int(m.group(1)) if m else None


def slugify(task: str, max_len: int = SLUG_MAX) -> str:
    """Lowercase ASCII words joined by dashes, at most `max_len` chars, never empty."""
    ascii_text = unicodedata.normalize("NFKD", task).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "task"


def protocol_name(number: int, task: str) -> str:
    """`protocol_name(1, "Some Task!")` -> `0001-some-task`."""
    if number < 0:
        raise ValueError("protocol number must be >= 0")
    return f"{number:04d}-{slugify(task)}"


def check_branch_name(name: str) -> str:
    """Return `name` if it is a branch name we accept, else raise GitError."""
    ok = (
        bool(_BRANCH_OK.match(name))
        and ".." not in name
        and "//" not in name
        and "/." not in name
        and not name.endswith(("/", ".", ".lock"))
        and not name.startswith("refs/")
        and name != "HEAD"
    )
    if not ok:
        raise GitError(f"unacceptable branch name {name!r}")
    return name


def has_credentials(url: str) -> bool:
    """True when a URL carries a password or token in its userinfo (`https://x:tok@host`)."""
    if "://" not in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return True  # unparsable: refuse rather than risk storing a secret
    return parts.password is not None or (
        parts.scheme in ("http", "https") and parts.username is not None
    )


def normalize_remote(url: str) -> str:
    """Local paths become absolute; URLs (and scp-like `host:path`) pass unchanged.

    Credentials never ride in a URL: they would end up in .git/config and in error messages.
    """
    if has_credentials(url):
        raise GitError("remote URL must not contain credentials; pass an auth header instead")
    if url.startswith("-") or "::" in url.partition("/")[0]:
        # an option, or a remote helper (`ext::<command>` runs a program): never a remote
        raise GitError("unacceptable remote URL")
    if "://" in url or _SCP_LIKE.match(url):
        return url
    return os.path.abspath(url)


def safe_repo_name(url: str) -> str:
    """A directory name for a remote: readable part plus a hash of the whole normalized URL."""
    norm = normalize_remote(url)
    parts = urlsplit(norm) if "://" in norm else None
    readable = f"{parts.hostname or ''}{parts.path}" if parts else norm
    readable = re.sub(r"\.git/?$", "", readable.rstrip("/"))
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", readable).strip("-.")[-60:].lstrip("-.")
    digest = hashlib.sha256(norm.encode()).hexdigest()[:10]
    return f"{readable or 'repo'}-{digest}"
