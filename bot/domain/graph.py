"""The step graph of a protocol (pure): dependencies, validation, readiness, and its picture.

A plan is a graph: each step may name the steps it depends on. A step that names none depends on
the step before it in the plan, so a plan written before graphs existed stays a chain and runs
exactly as it always did. Everything here works on plain values (indexes, statuses): the runner
asks these functions and does the I/O itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bot.domain.states import StepStatus

Deps = Mapping[int, tuple[int, ...]]

# a step whose work has started and not yet been merged into the protocol branch
ACTIVE_STATUSES = frozenset({StepStatus.RUNNING, StepStatus.NEEDS_QA})


def resolve_dependencies(
    nodes: Sequence[tuple[int, Sequence[int] | None]],
) -> dict[int, tuple[int, ...]]:
    """Each step's dependencies; None (not given) means the previous step, () a root."""
    out: dict[int, tuple[int, ...]] = {}
    previous: int | None = None
    for index, deps in nodes:
        if deps is None:
            out[index] = () if previous is None else (previous,)
        else:
            out[index] = tuple(dict.fromkeys(deps))  # duplicates say nothing more
        previous = index
    return out


def graph_errors(
    nodes: Sequence[tuple[int, Sequence[int] | None]], at: str = "$.steps"
) -> list[str]:
    """Why this graph cannot run, as `"$.steps[i].depends_on[k]: message"` strings (none: fine).

    Unknown ids, a step depending on itself, cycles, and a graph without a root (a step that
    depends on nothing, where the protocol starts).
    """
    errors: list[str] = []
    position = {index: pos for pos, (index, _) in enumerate(nodes)}
    for pos, (index, deps) in enumerate(nodes):
        for k, dep in enumerate(deps or ()):
            if dep == index:
                errors.append(f"{at}[{pos}].depends_on[{k}]: step {index} depends on itself")
            elif dep not in position:
                errors.append(f"{at}[{pos}].depends_on[{k}]: no step with id {dep}")
    if errors:
        return errors
    deps_of = resolve_dependencies(nodes)
    cycle = find_cycle(deps_of)
    if cycle:
        path = " → ".join(str(i) for i in cycle)
        errors.append(f"{at}[{position[cycle[0]]}].depends_on: dependency cycle {path}")
    if nodes and not any(not d for d in deps_of.values()):
        errors.append(
            f"{at}: no step without dependencies; the protocol would have nowhere to start"
        )
    return errors


def unsupported_in_graph(steps: Sequence[Mapping[str, object]], at: str = "$.steps") -> list[str]:
    """What a plan whose steps run side by side cannot honour, as JSON-path errors: a `loop`
    back to earlier steps and `triggers` (running or sending back another step) assume
    one step at a time on one branch; the scheduler of a graph would silently ignore them, so
    the spec is refused instead. A plain chain keeps both."""
    nodes: list[tuple[int, Sequence[int] | None]] = []
    for s in steps:
        index, deps = s.get("index"), s.get("depends_on")
        if not isinstance(index, int):
            return []
        nodes.append(
            (index, [d for d in deps if isinstance(d, int)] if isinstance(deps, list) else None)
        )
    deps_of = resolve_dependencies(nodes)
    if not deps_of or is_linear(deps_of, list(deps_of)):
        return []
    why = "is not supported in a plan whose steps run side by side (depends_on)"
    errors: list[str] = []
    for pos, s in enumerate(steps):
        loop = s.get("loop")
        # a loop back to the step itself is its fix loop (QA FAIL or red CI redo the step), which
        # a graph runs like a chain does; going back to earlier steps resets work merged already
        if isinstance(loop, Mapping) and loop.get("back_to", s.get("index")) != s.get("index"):
            errors.append(f"{at}[{pos}].loop.back_to: a loop back to an earlier step {why}")
        triggers = s.get("triggers")
        for k in range(len(triggers) if isinstance(triggers, list) else 0):
            errors.append(f"{at}[{pos}].triggers[{k}]: a trigger {why}")
    return errors


def find_cycle(deps: Deps) -> list[int]:
    """One cycle as [a, b, ..., a] (a depends on b ...), or [] when the graph is acyclic."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    path: list[int] = []

    def visit(node: int) -> list[int]:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, ()):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep in deps and dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in deps:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def is_linear(deps: Deps, order: Sequence[int]) -> bool:
    """Whether the graph is the plain chain of `order` (the behaviour before graphs existed)."""
    return all(
        deps.get(index, ()) == (() if pos == 0 else (order[pos - 1],))
        for pos, index in enumerate(order)
    )


@dataclass(frozen=True)
class StepView:
    """What readiness needs to know of one step."""

    status: str
    integrated: bool = True  # merged into the protocol branch (always, outside parallel mode)


def done(view: StepView | None) -> bool:
    return view is not None and view.status == StepStatus.COMPLETED and view.integrated


def missing_dependencies(deps: Deps, steps: Mapping[int, StepView], index: int) -> tuple[int, ...]:
    """The dependencies of `index` that are not completed and merged yet."""
    return tuple(d for d in deps.get(index, ()) if not done(steps.get(d)))


def ready_steps(deps: Deps, steps: Mapping[int, StepView]) -> list[int]:
    """Pending steps whose dependencies are all done, in plan order."""
    return [
        i
        for i in deps
        if steps.get(i, StepView(StepStatus.PENDING)).status == StepStatus.PENDING
        and not missing_dependencies(deps, steps, i)
    ]


def active_steps(steps: Mapping[int, StepView]) -> list[int]:
    """Steps that hold a slot: started (running or awaiting QA/CI), or completed but not merged."""
    return [
        i
        for i, v in steps.items()
        if v.status in ACTIVE_STATUSES or (v.status == StepStatus.COMPLETED and not v.integrated)
    ]


def to_start(ready: Iterable[int], active: int, bound: int) -> list[int]:
    """The ready steps that fit under the bound, given how many are active already."""
    room = max(0, bound - active)
    return list(ready)[:room]


_MERMAID_CLASS: dict[str, str] = {
    StepStatus.COMPLETED: "done",
    StepStatus.RUNNING: "running",
    StepStatus.NEEDS_QA: "running",
    StepStatus.FAILED: "failed",
    StepStatus.BLOCKED: "failed",
    StepStatus.CANCELLED: "failed",
}


def mermaid(deps: Deps, steps: Mapping[int, StepView], titles: Mapping[int, str]) -> str:
    """A Mermaid flowchart of the graph, one node per step labelled with its state."""
    lines = ["flowchart TD"]
    for index in deps:
        view = steps.get(index, StepView(StepStatus.PENDING))
        state = view.status
        if view.status == StepStatus.COMPLETED and not view.integrated:
            state = "completed, not merged"
        title = _mermaid_text(titles.get(index, ""))
        lines.append(f'  s{index}["{index:02d} {title}<br/>{state}"]')
    for index, ds in deps.items():
        lines.extend(f"  s{d} --> s{index}" for d in ds)
    for index in deps:
        css = _MERMAID_CLASS.get(steps.get(index, StepView(StepStatus.PENDING)).status)
        if css:
            lines.append(f"  class s{index} {css}")
    lines += [
        "  classDef done fill:#d4f8d4,stroke:#2a7a2a",
        "  classDef running fill:#fff3c4,stroke:#a07a00",
        "  classDef failed fill:#ffd6d6,stroke:#a02a2a",
    ]
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    # titles come from the plan (model output): nothing in them may close the label or the block
    cleaned = "".join(ch if ch.isalnum() or ch in " -_.,:/()" else " " for ch in text)
    return " ".join(cleaned.split())[:60]


def dependencies_of_config(config: Mapping[str, object] | None) -> dict[int, tuple[int, ...]]:
    """The resolved graph of a stored spec (ProtocolRun.template_config), without validating it
    again: the spec was validated when it was stored."""
    steps = (config or {}).get("steps")
    nodes: list[tuple[int, Sequence[int] | None]] = []
    for s in steps if isinstance(steps, list) else []:
        if isinstance(s, Mapping) and isinstance(s.get("index"), int):
            deps = s.get("depends_on")
            nodes.append(
                (int(s["index"]), [int(d) for d in deps] if isinstance(deps, list) else None)
            )
    return resolve_dependencies(nodes)


def runs_in_parallel(config: Mapping[str, object] | None) -> bool:
    """Whether a protocol's steps run on child branches, side by side: any graph but the plain
    chain. A chain keeps the one protocol branch, lock and worktree it always had."""
    deps = dependencies_of_config(config)
    return bool(deps) and not is_linear(deps, list(deps))


CHILD_SEPARATOR = "--"


def child_branch(protocol_name: str, step_index: int) -> str:
    """`NNNN-task--XX`: the branch a step of a graph runs on (a protocol name never has `--`)."""
    return f"{protocol_name}{CHILD_SEPARATOR}{step_index:02d}"


def parent_branch(branch: str) -> str:
    """The protocol branch a child branch belongs to (the branch itself when it is no child)."""
    return branch.split(CHILD_SEPARATOR, 1)[0]


def depths(deps: Deps) -> dict[int, int]:
    """Each step's column in a drawing of the graph: 0 for roots, else 1 + its deepest
    dependency."""
    out: dict[int, int] = {}

    def depth(index: int, seen: frozenset[int]) -> int:
        if index in out:
            return out[index]
        parents = [d for d in deps.get(index, ()) if d in deps and d not in seen]
        out[index] = 1 + max((depth(d, seen | {index}) for d in parents), default=-1)
        return out[index]

    for index in deps:
        depth(index, frozenset())
    return out
