"""Finding secrets in what the bot is about to push or publish, and redacting them (pure core).

Two kinds of needle:
- the exact values of every secret the process holds (settings, stored credentials, secret-looking
  environment variables, the auth header of the push at hand) and their base64 forms — including
  the three alignments a value takes *inside* a longer base64 text, so `base64 secrets.env` is
  caught too;
- well-known credential shapes that no configuration lists: GitHub and GitLab tokens, PEM private
  keys, AWS keys.

A finding names its kind and where it was seen, never the value.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Shorter values are too likely to occur by chance (and too weak to be worth stealing).
MIN_SECRET_LEN = 8
REDACTED = "[REDACTED]"

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,255}\b")),
    ("GitHub token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b")),
    ("GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}")),
    ("private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("AWS access key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    (
        "AWS secret key",
        re.compile(r"(?i)aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}"),
    ),
)

# Environment variables whose values count as secrets (names compared in upper case).
_SECRET_ENV_NAMES = frozenset(
    {"CODEX_API_KEY", "OPENAI_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "GITLAB_TOKEN", "CI_JOB_TOKEN"}
)
_SECRET_ENV_WORDS = (
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PRIVATE_KEY",
    "API_KEY",
    "CREDENTIAL",
)
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:([^/\s@]+)@")


def is_secret_env_name(name: str) -> bool:
    upper = name.upper()
    return upper in _SECRET_ENV_NAMES or any(word in upper for word in _SECRET_ENV_WORDS)


def secrets_in_environ(environ: Mapping[str, str]) -> list[str]:
    """Values of secret-looking variables, and passwords inside any URL-valued variable."""
    found = [v for k, v in environ.items() if is_secret_env_name(k)]
    for value in environ.values():
        found += [urllib.parse.unquote(m) for m in _URL_WITH_PASSWORD.findall(value)]
    return found


def _pem_parts(pem: str) -> list[str]:
    # The whole key, and each body line: a key leaked without its BEGIN line is still a leak.
    lines = [line.strip() for line in pem.splitlines()]
    return [pem.strip(), *(line for line in lines if len(line) >= 32 and "-----" not in line)]


def _embedded_base64(raw: bytes) -> Iterator[str]:
    """The parts of base64 text that only `raw` decides, for each alignment it may start at."""
    n = len(raw)
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw + b"\0\0").decode()
        start = -(-8 * shift // 6)  # first character made of raw's bits only
        end = (8 * (shift + n)) // 6  # one past the last such character
        core = encoded[start:end]
        if len(core) >= MIN_SECRET_LEN:
            yield core
            yield core.replace("+", "-").replace("/", "_")


def needles_for(value: str) -> dict[str, str]:
    """Every form of `value` to look for -> a description of that form."""
    value = value.strip()
    if len(value) < MIN_SECRET_LEN:
        return {}
    out = {value: "secret value"}
    raw = value.encode()
    for form in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        out.setdefault(form.rstrip("="), "base64 of a secret value")
    for core in _embedded_base64(raw):
        out.setdefault(core, "base64 of a secret value")
    quoted = urllib.parse.quote(value, safe="")
    out.setdefault(quoted, "URL-encoded secret value")
    return out


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} in {self.where}"


class SecretScanner:
    """Looks for a fixed set of secret values (all their forms) and the credential patterns."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        needles: dict[str, str] = {}
        for value in values:
            if isinstance(value, str):
                for form, kind in needles_for(value).items():
                    needles.setdefault(form, kind)
        # Longest first: a shorter form must never leave part of a longer one behind.
        self._needles = sorted(needles.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._alternation = (
            re.compile("|".join(re.escape(n) for n, _ in self._needles)) if self._needles else None
        )
        self._kinds = dict(self._needles)

    def __len__(self) -> int:
        return len(self._needles)

    def kinds_in(self, text: str) -> list[str]:
        """What kinds of secret `text` holds (empty: none); never the values themselves."""
        kinds: list[str] = []
        if self._alternation is not None:
            for match in self._alternation.finditer(text):
                kinds.append(self._kinds[match.group(0)])
        for kind, pattern in PATTERNS:
            if pattern.search(text):
                kinds.append(kind)
        return sorted(set(kinds))

    def scan(self, text: str, where: str) -> list[Finding]:
        return [Finding(kind, where) for kind in self.kinds_in(text)]

    def redact(self, text: str) -> str:
        """`text` with every secret value, its encodings and credential-shaped strings replaced."""
        if self._alternation is not None:
            text = self._alternation.sub(REDACTED, text)
        for _kind, pattern in PATTERNS:
            text = pattern.sub(REDACTED, text)
        return text

    def redact_obj(self, value: Any) -> Any:
        """A JSON-like value with every string in it (keys too) redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact_obj(k): self.redact_obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_obj(v) for v in value]
        return value


# -- the secrets this process holds ----------------------------------------------------------
# Settings and stored credentials are registered once at start-up (build_services); environment
# values and per-command tokens are added at scan time, so a token minted later is covered too.

# Insertion-ordered, bounded: tokens minted every hour must not grow the scanner for ever, and a
# token that old has expired anyway.
MAX_REGISTERED = 200
_registered: dict[str, None] = {}
_lock = threading.Lock()


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember values that must never be pushed or published (tokens as they are used, …)."""
    with _lock:
        for value in values:
            if value and len(value.strip()) >= MIN_SECRET_LEN:
                _registered.pop(value.strip(), None)
                _registered[value.strip()] = None
        while len(_registered) > MAX_REGISTERED:
            del _registered[next(iter(_registered))]


def register_settings(settings: Any) -> None:
    """The settings' secrets, the GitHub App key and credentials stored in the data dir."""
    values: list[str | None] = list(settings.secret_values())
    try:
        pem = settings.github_private_key_pem()
    except OSError:
        pem = None
    if pem:
        values += _pem_parts(pem)
    for url in (settings.db_url, settings.redis_url):
        if url:
            values += [urllib.parse.unquote(m) for m in _URL_WITH_PASSWORD.findall(url)]
    stored = Path(settings.data_dir) / "github-app.json"
    try:
        data = json.loads(stored.read_text()) if stored.is_file() else {}
    except (OSError, ValueError):
        data = {}
    for key in ("pem", "webhook_secret", "client_secret"):
        item = data.get(key) if isinstance(data, dict) else None
        if isinstance(item, str):
            values += _pem_parts(item) if key == "pem" else [item]
    register_secrets(values)


def registered_secrets() -> list[str]:
    with _lock:
        return list(_registered)


def process_scanner(
    extra: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> SecretScanner:
    """A scanner for everything this process holds now, plus `extra` (e.g. an auth header)."""
    env = os.environ if environ is None else environ
    return SecretScanner([*registered_secrets(), *secrets_in_environ(env), *extra])
