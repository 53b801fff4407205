"""What the GitHub App must be granted: each request the adapter makes → the permission it needs.

app.yml (the manifest) must ask for exactly the union of these; a test drives the adapter,
maps every request it sends through this table, and compares the result with app.yml, so a
new request without an entry here, or a manifest that asks for more or less, fails the suite.
The doctor compares the same requirements with what a live App was granted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot.forge.kinds import GITHUB

MANIFEST = Path(__file__).resolve().parent.parent.parent / "app.yml"
LEVELS = {"none": 0, "read": 1, "write": 2, "admin": 3}
_REPO = r"/repos/[^/]+/[^/]+"


@dataclass(frozen=True)
class Need:
    """A request (method + path regex, matched on the path without its query) and its grant."""

    method: str
    pattern: str
    permission: str | None  # None: app-level (JWT) or unauthenticated, no repository grant
    level: str
    why: str

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method and re.fullmatch(self.pattern, path) is not None


REQUESTS: tuple[Need, ...] = (
    Need("GET", r"/app", None, "none", "who we are (slug for our own comments)"),
    Need("GET", _REPO + r"/installation", None, "none", "installation of a repository"),
    Need("POST", r"/app/installations/\d+/access_tokens", None, "none", "installation token"),
    Need("POST", r"/app-manifests/[^/]+/conversions", None, "none", "manifest flow"),
    Need("POST", _REPO + r"/issues/comments/\d+/reactions", "issues", "write", "👀 🚀 😕"),
    Need("POST", _REPO + r"/issues/\d+/comments", "issues", "write", "replies, status comment"),
    Need("GET", _REPO + r"/issues/\d+/comments", "issues", "read", "find our status comment"),
    Need("PATCH", _REPO + r"/issues/comments/\d+", "issues", "write", "edit the status comment"),
    Need("GET", _REPO + r"/pulls", "pull_requests", "read", "the protocol's open PR"),
    Need("POST", _REPO + r"/pulls", "pull_requests", "write", "open the draft PR"),
    Need("PATCH", _REPO + r"/pulls/\d+", "pull_requests", "write", "update the PR"),
    Need("GET", _REPO + r"/pulls/\d+", "pull_requests", "read", "is the PR from a fork"),
    Need(
        "GET",
        _REPO + r"/pulls/\d+/reviews/\d+/comments",
        "pull_requests",
        "read",
        "a review's comments",
    ),
    Need(
        "GET",
        _REPO + r"/pulls/\d+/reviews/\d+",
        "pull_requests",
        "read",
        "the state of a comment's review",
    ),
    Need(
        "POST",
        _REPO + r"/pulls/\d+/comments/\d+/replies",
        "pull_requests",
        "write",
        "answer a review thread",
    ),
    Need("POST", r"/graphql", "pull_requests", "write", "mark the draft PR ready for review"),
    Need("POST", _REPO + r"/check-runs", "checks", "write", "step and QA check runs"),
    Need("PATCH", _REPO + r"/check-runs/\d+", "checks", "write", "update a check run"),
    Need("GET", _REPO + r"/commits/[^/]+/check-runs", "checks", "read", "find our check run"),
    Need("GET", _REPO + r"/commits/[^/]+/check-suites", "checks", "read", "CI results"),
    Need(
        "GET", _REPO + r"/check-runs/\d+/annotations", "checks", "read", "a red check's annotations"
    ),
    Need("GET", _REPO + r"/actions/jobs/\d+/logs", "actions", "read", "a failed Actions job's log"),
    Need(
        "GET",
        _REPO + r"/collaborators/[^/]+/permission",
        "metadata",
        "read",
        "who may run commands",
    ),
    Need("GET", _REPO, "metadata", "read", "default branch"),
    Need("GET", _REPO + r"/contents/.+", "contents", "read", "does .github/workflows exist"),
)

# Needs that no REST request shows: git over HTTPS with the installation token, and events.
GIT_NEEDS: Mapping[str, tuple[str, str]] = {
    "contents": ("write", "push the protocol branch"),
    # GitHub refuses a push that adds or changes .github/workflows/* without it (`/init`)
    "workflows": ("write", "push .github/workflows/deksdenflow-ci.yml on /init"),
}
# Events whose payloads are only readable with these grants (GitHub withholds the event
# subscription otherwise): workflow_run needs actions, status needs statuses.
EVENT_NEEDS: Mapping[str, tuple[str, str]] = {
    "actions": ("read", "workflow_run events (GitHub Actions results)"),
    "statuses": ("read", "status events (external CI)"),
}
# the events the App subscribes to: every one the recorder keeps, except the installation
# events, which GitHub sends every App without a subscription
EVENTS: tuple[str, ...] = tuple(
    e for e in GITHUB.recorded_events if e not in ("installation", "installation_repositories")
)


def need_for(method: str, path: str) -> Need | None:
    """The table entry covering one request; the query string is ignored."""
    bare = path.split("?", 1)[0]
    return next((need for need in REQUESTS if need.matches(method, bare)), None)


def _raise(into: dict[str, str], permission: str, level: str) -> None:
    if LEVELS[level] > LEVELS.get(into.get(permission, "none"), 0):
        into[permission] = level


def required_permissions(requests: Iterable[Need] = REQUESTS) -> dict[str, str]:
    """The highest level each permission is needed at, over requests, git and events."""
    needed: dict[str, str] = {}
    for need in requests:
        if need.permission is not None:
            _raise(needed, need.permission, need.level)
    for permission, (level, _) in {**GIT_NEEDS, **EVENT_NEEDS}.items():
        _raise(needed, permission, level)
    return needed


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def missing_permissions(required: Mapping[str, str], granted: Mapping[str, Any]) -> dict[str, str]:
    """Permissions granted below the required level: name → required level."""
    return {
        name: level
        for name, level in sorted(required.items())
        if LEVELS.get(str(granted.get(name, "none")), 0) < LEVELS[level]
    }


def missing_events(required: Iterable[str], granted: Iterable[str]) -> list[str]:
    have = set(granted)
    return [event for event in required if event not in have]
