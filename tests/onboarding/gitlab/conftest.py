"""The GitLab end-to-end world (fake GitLab over HTTP, bare origin, running app), reused."""

from __future__ import annotations

from tests.gitlab_e2e.conftest import fake_gitlab, origin, world, world_factory

__all__ = ["fake_gitlab", "origin", "world", "world_factory"]
