"""How the house is built: import cycles, long functions, forge leaks, complexity, duplicates.

Run `python bench/house.py [DIR]` (DIR defaults to this checkout). It reads the source as text
(ast), imports nothing of the project, and prints figures to compare before and after a
refactor. `radon` and `duplicates` are
run when they are installed; their absence is said, not failed on.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# `python bench/house.py DIR` measures another checkout (e.g. `git archive` of an older commit)
ROOT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "engines")
# a forge leak: code outside bot/forge that asks which forge it has instead of calling the interface
LEAK = re.compile(r"provider\s*[!=]=|getattr\(\s*(self\.)?forge\b")

# The layers of README's architecture table, lowest first: a module may import its own layer and
# the ones below. The longest matching prefix names a module's layer.
LAYERS: dict[str, int] = {
    # 0 foundation: configuration, errors, logging
    "bot.core": 0,
    # 1 the pure domain, and the pure pieces of lower packages: names, the interfaces, sans-I/O
    # webhook parsing, the CodeMachine parser and mapping
    "bot.domain": 1,
    "bot.codemachine.parser": 1,
    "bot.codemachine.mapping": 1,
    "bot.codemachine": 1,
    "bot.git.names": 1,
    "engines.base": 1,
    "bot.forge.base": 1,
    "bot.forge.kinds": 1,
    "bot.handlers.sansio": 1,
    "bot.handlers.forge_events": 1,
    # 2 storage and adapters: the database, forges, git, engines
    "bot.storage": 2,
    "bot.forge": 2,
    "bot.git": 2,
    "engines": 2,
    # 3 work: jobs (and the services and actions they share), handlers, the CodeMachine importer
    "bot.jobs": 3,
    "bot.handlers": 3,
    "bot.codemachine.importer": 3,
    # 4 entry points: web and command line
    "bot.web": 4,
    "bot.cli": 4,
    "bot.__main__": 4,
    "bot": 4,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class Import:
    source: str
    targets: tuple[str, ...]
    in_function: bool
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


class _Collector(ast.NodeVisitor):
    """Every import of a module, marked with whether it sits inside a function body."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        # `if TYPE_CHECKING:` imports never run: they are no edge of the runtime graph
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, targets: tuple[str, ...], line: int) -> None:
        self.found.append(Import(self.module, targets, self.depth > 0, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            # `import a.b.c` runs a, a.b and a.b.c: the deepest one of ours is the edge
            self._add(tuple(".".join(parts[:n]) for n in range(len(parts), 0, -1)), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(node, self.module, self.is_package)
        for alias in node.names:
            # `from bot import api` and `from bot.web.api import x` both name the module bot.web.api
            self._add((f"{base}.{alias.name}", base), node.lineno)


def collect_imports(modules: set[str]) -> list[Import]:
    """Imports between our own modules, each to the deepest module of ours that it names."""
    found: list[Import] = []
    for path in source_files():
        module = module_name(path)
        collector = _Collector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), str(path)))
        seen: set[tuple[str, int]] = set()
        for imp in collector.found:
            target = next((t for t in imp.targets if t in modules), None)
            if target is not None and target != module and (target, imp.line) not in seen:
                seen.add((target, imp.line))
                found.append(Import(module, (target,), imp.in_function, imp.line))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of two or more modules (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    result.append(sorted(component))
    return result


def import_report() -> None:
    modules = {module_name(p) for p in source_files()}
    imports = collect_imports(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.targets[0])
    inner = [i for i in imports if i.in_function]
    print(
        f"modules: {len(modules)}; imports between them: {len(imports)}; "
        f"inside functions: {len(inner)}"
    )
    cycles = strongly_connected(graph)
    print(
        "import cycles (strongly connected components, module- and function-level edges): "
        f"{len(cycles)}"
    )
    for component in cycles:
        print(f"  {len(component)} modules: {' '.join(component)}")
    top: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if not imp.in_function:
            top[imp.source].add(imp.targets[0])
    print(f"cycles among module-level imports only: {len(strongly_connected(top))}")
    upward = sorted(
        {
            f"{i.source} ({layer_of(i.source)}) -> {i.targets[0]} ({layer_of(i.targets[0])})"
            for i in imports
            if (layer_of(i.source) or 0) < (layer_of(i.targets[0]) or 0)
        }
    )
    unmapped = sorted(m for m in modules if layer_of(m) is None)
    print(f"imports that run back up the layers (README's table): {len(upward)}")
    for line in upward:
        print(f"  {line}")
    if unmapped:
        print(f"modules in no layer: {' '.join(unmapped)}")


def longest_functions(count: int = 15) -> None:
    rows: list[tuple[int, str]] = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    rows.sort(reverse=True)
    print(f"the {count} longest functions (lines):")
    for lines, where in rows[:count]:
        print(f"  {lines:4d}  {where}")


def forge_leaks() -> None:
    hits: list[str] = []
    for path in source_files():
        relative = path.relative_to(ROOT)
        # the forge package and its factory are where the forges are told apart
        if relative.parts[:2] == ("bot", "forge") or relative == Path("bot/jobs/services.py"):
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            # `Project.provider == "gitlab"` is a database filter, not a question to a forge
            if LEAK.search(text) and not re.search(r"\b[A-Z]\w*\.provider\b", text):
                hits.append(f"  {relative}:{number}: {text.strip()[:90]}")
    print(f"`provider ==` / `getattr(forge` checks outside bot/forge and its factory: {len(hits)}")
    print("\n".join(hits))


def run_tool(title: str, command: list[str]) -> None:
    exe = shutil.which(command[0]) or str(Path(sys.executable).parent / command[0])
    if not Path(exe).exists():
        print(f"{title}: {command[0]} is not installed")
        return
    done = subprocess.run(
        [exe, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    print(f"{title}:")
    print(done.stdout.rstrip())


def radon_summary() -> None:
    exe = Path(sys.executable).parent / "radon"
    if not exe.exists():
        print("radon: not installed")
        return
    done = subprocess.run(
        [str(exe), "cc", "-s", "-n", "C", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    blocks = [line.strip() for line in done.stdout.splitlines() if line.startswith("    ")]
    grades: dict[str, int] = {}
    for block in blocks:
        grade = block.rsplit(" - ", 1)[1].split()[0] if " - " in block else "?"
        grades[grade] = grades.get(grade, 0) + 1
    scored = sorted(blocks, key=lambda b: -int(b.rsplit("(", 1)[1].rstrip(")")))
    print(
        f"radon cc -s -n C: {len(blocks)} blocks graded C or worse: {dict(sorted(grades.items()))}"
    )
    for block in scored[:10]:
        print(f"  {block}")


def main() -> None:
    import_report()
    print()
    longest_functions()
    print()
    forge_leaks()
    print()
    radon_summary()
    print()
    run_tool(
        "duplicates (bot, engines)",
        ["duplicates", "--repo", "bot", "--most", "8", "--seconds", "60"],
    )
    run_tool(
        "duplicates (engines)",
        ["duplicates", "--repo", "engines", "--most", "3", "--seconds", "30"],
    )


if __name__ == "__main__":
    main()
