"""Fixtures for the GitLab adapter tests: the fake server, a client and forge pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bot.forge.base import RepoRef
from bot.forge.gitlab import GitLabForge
from bot.forge.gitlab_client import GitLabClient
from tests.gitlab.fake_gitlab import FakeGitLab, fake_gitlab

__all__ = ["fake_gitlab"]  # re-exported so pytest sees the fixture here


@pytest.fixture
def sleeps() -> list[float]:
    """Delays the client asked to sleep; recorded instead of slept, so retry tests are instant."""
    return []


@pytest.fixture
def client(fake_gitlab: FakeGitLab, sleeps: list[float]) -> Iterator[GitLabClient]:
    gl = GitLabClient(fake_gitlab.url, fake_gitlab.token, timeout=5.0, sleep=sleeps.append)
    yield gl
    gl.close()


@pytest.fixture
def forge(client: GitLabClient) -> GitLabForge:
    return GitLabForge(client)


@pytest.fixture
def project(fake_gitlab: FakeGitLab) -> dict[str, Any]:
    return fake_gitlab.add_project("acme/widgets", project_id=7)


@pytest.fixture
def repo(project: dict[str, Any]) -> RepoRef:
    return RepoRef(provider="gitlab", full_name=project["path_with_namespace"], forge_id="7")
