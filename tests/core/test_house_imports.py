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
    import_graph,
    layer_of,
    module_name,
    source_files,
    strongly_connected,
    upward_imports,
)


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    # house.py reads its root from argv when run as a script; under pytest argv is pytest's
    monkeypatch.setattr(house, "ROOT", ROOT)
    assert len(list(source_files())) > 100


def test_no_import_cycles_and_none_inside_functions() -> None:
    modules = {module_name(p) for p in source_files()}
    imports = collect_imports(modules)
    assert strongly_connected(import_graph(imports, modules)) == []
    assert [f"{i.source}:{i.line}" for i in imports if i.in_function] == []


def test_no_import_runs_back_up_the_layers() -> None:
    modules = {module_name(p) for p in source_files()}
    assert upward_imports(collect_imports(modules)) == []
    assert sorted(m for m in modules if layer_of(m) is None) == []
