"""The engine registry: maps a StepSpec's engine id to the Engine that runs it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from bot.core.errors import EngineError
from engines.base import Engine
from engines.codex import CodexEngine
from engines.scripted import ScriptedEngine


class EngineRegistry:
    """engine_id → Engine."""

    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: dict[str, Engine] = {}
        for engine in engines:
            self.register(engine)

    def register(self, engine: Engine, *, replace: bool = False) -> None:
        if engine.engine_id in self._engines and not replace:
            raise EngineError(f"engine {engine.engine_id!r} is already registered")
        self._engines[engine.engine_id] = engine

    def get(self, engine_id: str) -> Engine:
        try:
            return self._engines[engine_id]
        except KeyError:
            known = ", ".join(sorted(self._engines)) or "none"
            raise EngineError(f"unknown engine {engine_id!r}; known engines: {known}") from None

    def ids(self) -> list[str]:
        return sorted(self._engines)

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._engines

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self._engines)


def default_registry(
    *,
    codex_bin: str = "codex",
    codex_home: str | None = None,
    scripted_script: Path | None = None,
    extra_env_allow: Iterable[str] = (),
    engine_user: str | None = None,
) -> EngineRegistry:
    """The codex and scripted engines, configured from plain settings values.

    `extra_env_allow` names worker environment variables codex may also see, e.g. the
    `env_key` of a custom model provider in CODEX_HOME/config.toml.
    """
    return EngineRegistry(
        [
            CodexEngine(
                codex_bin, codex_home=codex_home, env_allow=extra_env_allow, run_as=engine_user
            ),
            ScriptedEngine(scripted_script),
        ]
    )
