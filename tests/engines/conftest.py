"""Engine test fixtures: the fake model server and a codex CLI wired to it."""

from tests.fakes.codex_fixtures import codex_bin, fake_codex, fake_model, git_repo

__all__ = ["codex_bin", "fake_codex", "fake_model", "git_repo"]
