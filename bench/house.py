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


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
    """Module -> the modules it imports (function-level imports included)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.targets[0])
    return graph


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports from a lower layer to a higher one (README's table), as "a (n) -> b (m)"."""
    return sorted(
        {
            f"{i.source} ({layer_of(i.source)}) -> {i.targets[0]} ({layer_of(i.targets[0])})"
            for i in imports
            if (layer_of(i.source) or 0) < (layer_of(i.targets[0]) or 0)
        }
    )


def import_report() -> None:
    modules = {module_name(p) for p in source_files()}
    imports = collect_imports(modules)
    graph = import_graph(imports, modules)
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
    upward = upward_imports(imports)
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


# -- raw status literals ---------------------------------------------------------------------
# A string constant equal to a StepStatus/ProtocolStatus value, in a status context: compared
# with something named `status`, assigned or passed as one, a key of a status map, or one of a
# tuple/list/set made only of statuses. The same words are also CI results, engine outcomes,
# check-run states and webhook-delivery statuses: contexts naming those are not counted.
STATUS_DIRS = ("bot", "engines", "tests")
STATUS_WORD = re.compile(r"status(?!_code)", re.IGNORECASE)
NOT_A_STEP_STATUS = re.compile(
    r"deliver|processing|conclusion|check\.|check_run|suite|CheckState|pipeline|gitlab_state"
    r"|\bci_status|CIStatus|success|failure|report\.status|\"data\"|item\.|prev\.get"
    r"|file_change|command_execution|processed|outcomes|dig\(|report\(",
    re.IGNORECASE,
)
# whole files about another status: webhook deliveries, GitLab commit statuses
NOT_STEP_STATUS_FILES = (
    "tests/intake/",
    "tests/faults/",
    "tests/gitlab/fake_gitlab.py",
    "tests/gitlab/test_gitlab_forge.py",
)
# a function taking `status: CheckState` (or a CI/GitLab one) compares that status, not ours
OTHER_STATUS_TYPE = re.compile(r":\s*(CheckState|CIStatus|GitLabState)\b")


def status_values() -> frozenset[str]:
    """The enums' values, read from bot/domain/states.py without importing it."""
    tree = ast.parse((ROOT / "bot/domain/states.py").read_text())
    values: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("ProtocolStatus", "StepStatus"):
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant):
                    values.add(str(item.value.value))
    return frozenset(values)


_PASS_THROUGH = (ast.Tuple, ast.List, ast.Set, ast.IfExp, ast.BoolOp, ast.Starred, ast.Subscript)


def status_nodes(tree: ast.AST, text: str, values: frozenset[str]) -> Iterator[ast.Constant]:
    """The status literals of one module (see the section's comment)."""
    parent: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parent[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and node.value in values):
            continue
        up: ast.AST = node
        while isinstance(parent.get(up), _PASS_THROUGH):
            up = parent[up]
        ctx = parent.get(up)
        stmt = ctx
        while stmt is not None and not isinstance(stmt, ast.stmt):
            stmt = parent.get(stmt)
        if (
            _is_status(node, up, ctx, text, values)
            and not NOT_A_STEP_STATUS.search(_header(stmt, text))
            and not OTHER_STATUS_TYPE.search(_signature(stmt, parent, text))
        ):
            yield node


def _signature(stmt: ast.AST | None, parent: dict[ast.AST, ast.AST], text: str) -> str:
    """The parameters of the function around a statement (`status: CheckState` says which)."""
    node = stmt
    while node is not None and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        node = parent.get(node)
    if node is None:
        return ""
    return "\n".join(text.splitlines()[node.lineno - 1 : node.body[0].lineno - 1])


def _header(stmt: ast.AST | None, text: str) -> str:
    """A statement's own text: for a compound one, only its first line (not its body)."""
    if stmt is None:
        return ""
    if isinstance(stmt, ast.If | ast.While):
        return ast.get_source_segment(text, stmt.test) or ""
    if isinstance(stmt, ast.For | ast.AsyncFor):
        return ast.get_source_segment(text, stmt.iter) or ""
    if isinstance(stmt, ast.With | ast.AsyncWith | ast.Try | ast.FunctionDef | ast.ClassDef):
        return text.splitlines()[stmt.lineno - 1]
    return ast.get_source_segment(text, stmt) or ""


def _is_status(
    node: ast.Constant, up: ast.AST, ctx: ast.AST | None, text: str, values: frozenset[str]
) -> bool:
    def src(n: ast.AST) -> str:
        return ast.get_source_segment(text, n) or ""

    if isinstance(up, ast.Tuple | ast.List | ast.Set) and len(up.elts) >= 2:
        if all(isinstance(e, ast.Constant) and e.value in values for e in up.elts):
            return True
    if isinstance(ctx, ast.Compare):
        if up is ctx.left and isinstance(ctx.ops[0], ast.In | ast.NotIn) and up is node:
            return False  # `"completed" in body`: a substring test
        others = [ctx.left, *ctx.comparators]
        return any(STATUS_WORD.search(src(o)) for o in others if o is not up)
    if isinstance(ctx, ast.keyword):
        return bool(ctx.arg and STATUS_WORD.search(ctx.arg))
    if isinstance(ctx, ast.Call):
        return bool(STATUS_WORD.search(src(ctx.func))) or any(
            STATUS_WORD.search(src(a)) for a in ctx.args if a is not up
        )
    if isinstance(ctx, ast.Assign | ast.AnnAssign):
        targets = ctx.targets if isinstance(ctx, ast.Assign) else [ctx.target]
        return any(STATUS_WORD.search(src(t)) for t in targets)
    if isinstance(ctx, ast.Dict):
        keys = [k for k in ctx.keys if k is not None]
        if up in keys:
            return len(keys) >= 2 and all(
                isinstance(k, ast.Constant) and k.value in values for k in keys
            )
        key = ctx.keys[ctx.values.index(up)] if up in ctx.values else None
        return isinstance(key, ast.Constant) and key.value == "status"
    return False


def status_literals(show: bool = False) -> None:
    values = status_values()
    per_dir: dict[str, int] = {}
    per_file: dict[str, int] = {}
    for top in STATUS_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if str(path.relative_to(ROOT)).startswith(NOT_STEP_STATUS_FILES):
                continue
            text = path.read_text()
            lines = [n.lineno for n in status_nodes(ast.parse(text, str(path)), text, values)]
            if lines:
                relative = str(path.relative_to(ROOT))
                per_file[relative] = len(lines)
                per_dir[top] = per_dir.get(top, 0) + len(lines)
                if show:
                    for line in sorted(lines):
                        print(f"  {relative}:{line}: {text.splitlines()[line - 1].strip()[:90]}")
    print(
        f"raw status literals (StepStatus/ProtocolStatus values in status contexts, "
        f"{'/'.join(STATUS_DIRS)}; migrations/ not read): {sum(per_dir.values())} {per_dir}"
    )
    for relative, count in sorted(per_file.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {count:4d}  {relative}")


def main() -> None:
    import_report()
    print()
    longest_functions()
    print()
    forge_leaks()
    print()
    radon_summary()
    print()
    status_literals()
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
