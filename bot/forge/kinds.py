"""What differs between kinds of forge before there is a forge to ask: one row per provider.

The webhook intake, the recorder, the git_url rule and the console hold a provider name (of a
delivery or a project row), not a Forge. They look its behaviour up here instead of comparing
names, so a new forge is one new row. Pure data: the sans-I/O intake may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.domain.security import RepoUrlRule

# A field of a delivery's summary: its name and the payload paths tried in order (the first
# that holds a string or a number gives it).
SummaryField = tuple[str, tuple[tuple[str, ...], ...]]


@dataclass(frozen=True)
class ForgeKind:
    """How one kind of forge names repositories and what its webhook deliveries look like."""

    name: str  # the provider name stored on projects and deliveries
    repo_url: RepoUrlRule
    # the event (lower case) a forge sends when someone tests a hook: answered, never stored
    ping_event: str | None = None
    recorded_events: tuple[str, ...] = ()  # deliveries the recorder keeps an Event of
    summary: tuple[SummaryField, ...] = ()  # what identifies a delivery in that Event

    @property
    def checkout_is_origin(self) -> bool:
        """A project's git_url is a checkout on this machine that commits can be read from."""
        return self.repo_url.path


GITHUB = ForgeKind(
    name="github",
    repo_url=RepoUrlRule("github", depth=2),  # owner/name, nothing nests
    ping_event="ping",
    recorded_events=(
        "issue_comment",
        "issues",
        "pull_request",
        "check_suite",
        "check_run",
        "workflow_run",
        "status",
        "pull_request_review",
        "pull_request_review_comment",
        "installation",
        "installation_repositories",
    ),
    summary=(
        ("repository", (("repository", "full_name"),)),
        ("sender", (("sender", "login"),)),
        ("installation", (("installation", "id"),)),
        ("number", (("issue", "number"), ("pull_request", "number"))),
    ),
)
GITLAB = ForgeKind(
    name="gitlab",
    repo_url=RepoUrlRule("gitlab"),  # group/subgroup/…/name
    ping_event="test hook",  # X-Gitlab-Event of the "Test" button
    recorded_events=(
        "note hook",
        "issue hook",
        "merge request hook",
        "pipeline hook",
        "confidential note hook",
        "confidential issue hook",
    ),
    summary=(
        ("project", (("project", "path_with_namespace"),)),
        ("user", (("user", "username"),)),
        ("kind", (("object_kind",),)),
    ),
)
LOCAL = ForgeKind(name="local", repo_url=RepoUrlRule("local", path=True))  # no webhooks

KINDS: dict[str, ForgeKind] = {kind.name: kind for kind in (GITHUB, GITLAB, LOCAL)}


def forge_kind(provider: str) -> ForgeKind | None:
    """The row of `provider`; None for a source that is no forge (the CI hook) or unknown."""
    return KINDS.get(provider)
