"""Onboarding fixtures: the protocol tests' bare origin and runtime helpers, reused."""

from __future__ import annotations

from tests.fakes.codex_fixtures import codex_bin, fake_codex, fake_model
from tests.protocol.conftest import harness, origin

__all__ = ["codex_bin", "fake_codex", "fake_model", "harness", "origin"]
