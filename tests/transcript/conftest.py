"""Transcript fixtures: the protocol harness (scripted engine, local forge)."""

from tests.protocol.conftest import harness, origin

__all__ = ["harness", "origin"]
