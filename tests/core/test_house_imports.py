"""The house's import rules, held by a test (bench/house.py prints the same counts): no import
cycle, no import inside a function between our modules, and no import back up the layers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from bench import house  # noqa: E402
from bench.house import (  # noqa: E402
    collect_imports,
    layer_of,
    module_name,
    source_files,
    strongly_connected,
)


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    # house.py reads its root from argv when run as a script; under pytest argv is pytest's
    monkeypatch.setattr(house, "ROOT", ROOT)
    assert len(list(source_files())) > 100


def test_no_import_cycles_and_none_inside_functions() -> None:
    modules = {module_name(p) for p in source_files()}
    imports = collect_imports(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.targets[0])
    assert strongly_connected(graph) == []
    assert [f"{i.source}:{i.line}" for i in imports if i.in_function] == []


def test_no_import_runs_back_up_the_layers() -> None:
    modules = {module_name(p) for p in source_files()}
    upward = [
        f"{i.source} -> {i.targets[0]}"
        for i in collect_imports(modules)
        if (layer_of(i.source) or 0) < (layer_of(i.targets[0]) or 0)
    ]
    assert upward == []
    assert sorted(m for m in modules if layer_of(m) is None) == []
