"""Engines: the agents that do a protocol's work (codex CLI, scripted)."""

from engines.base import Engine, EngineRequest, EngineResult, TokenUsage

__all__ = ["Engine", "EngineRequest", "EngineResult", "TokenUsage"]
