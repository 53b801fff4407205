"""Engines: the agents that do a protocol's work (codex CLI, scripted)."""
