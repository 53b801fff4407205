"""A parsed CodeMachine workspace → a ProtocolSpec and its protocol files (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bot.codemachine.parser import (
    DEFAULT_LOOP_ITERATIONS,
    MODULES,
    SPECIFICATIONS,
    Call,
    CodeMachineError,
    Workspace,
)
from bot.domain.spec import protocol_dir, spec_to_dict, step_file_name, validate_spec
from bot.git.names import slugify


@dataclass
class ImportPlan:
    """What an import creates: the spec data, the protocol files, warnings for the operator."""

    spec: dict[str, Any]
    files: dict[str, str]  # repository path → content
    workflow: str
    warnings: list[str]


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _fill_placeholders(ws: Workspace, text: str, outputs: list[str]) -> str:
    user = ws.placeholders.get("userDir", {})
    package = ws.placeholders.get("packageDir", {})

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in user:
            path = user[name]
            if path.startswith(".codemachine/artifacts/") or path.startswith(
                ".codemachine/prompts/"
            ):
                outputs.append(_glob_root(path))
            return f"`{path}`"
        if name in package:
            return ws.files.get(package[name], f"`{package[name]}`")
        return m.group(0)  # braces in code or JSON stay as they are

    return _PLACEHOLDER.sub(sub, text)


def _glob_root(path: str) -> str:
    parts = path.split("/")
    for k, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:k]) or "."
    return path


# (resolveStep | resolveModule, agent or module id, the call's options)
Entry = tuple[str, str, dict[str, Any]]


class _Source(NamedTuple):
    """One workflow entry with what it names: the agent or module and the call's options."""

    ident: str
    source: Mapping[str, Any]
    opts: Mapping[str, Any]


@dataclass
class _Context:
    """What every step's mapping reads, and the warnings it adds to."""

    ws: Workspace
    base: str
    engine: str
    known_engines: set[str]
    qa_policy: str
    entries: list[Entry]
    first_index: dict[str, int]  # each main agent's first step, for loop ranges and trigger targets
    warnings: list[str] = field(default_factory=list)
    workflow_file: str = ""  # named in errors


def _options(call: Call) -> dict[str, Any]:
    return dict(call.args[1]) if len(call.args) > 1 else {}


def _trigger_target(ws: Workspace, module_id: str, opts: Mapping[str, Any]) -> str | None:
    behavior = ws.modules[module_id]["behavior"]
    target = opts.get("triggerAgentId") or behavior.get("triggerAgentId")
    return str(target) if behavior["type"] == "trigger" and target else None


def plan_entries(
    ws: Workspace, workflow_file: str
) -> tuple[list[Entry], dict[str, int], list[str]]:
    """The workflow's steps in order, plus trigger targets that are no step of it (appended)."""
    calls = [
        c
        for c in ws.workflows[workflow_file]["steps"]
        if c.function in ("resolveStep", "resolveModule")
    ]
    entries: list[Entry] = [(c.function, c.args[0], _options(c)) for c in calls]
    first_index: dict[str, int] = {}
    for i, (function, ident, _opts) in enumerate(entries, start=1):
        if function == "resolveStep":
            first_index.setdefault(ident, i)
    warnings: list[str] = []
    for function, ident, opts in list(entries):
        target = _trigger_target(ws, ident, opts) if function == "resolveModule" else None
        if target is None or target in first_index:
            continue
        if target not in ws.main_agents:
            raise CodeMachineError(
                workflow_file, "triggerAgentId", f"unknown main agent {target!r}"
            )
        first_index[target] = len(entries) + 1
        entries.append(("resolveStep", target, {}))
        warnings.append(
            f"trigger target {target!r} is not a workflow step: added as step {first_index[target]}"
        )
    return entries, first_index, warnings


def _unique_slug(ident: str, index: int, used: set[str]) -> str:
    slug = slugify(ident, 40)
    while slug in used:
        slug = f"{slug[:40]}-{index}"
    used.add(slug)
    return slug


def _engine_fields(cx: _Context, step: dict[str, Any], call: _Source) -> None:
    """The step's own engine and model, when this server has that engine (else a warning)."""
    ident, source, opts = call
    step_engine = opts.get("engine") or source.get("engine")
    step_model = opts.get("model") or source.get("model")
    if step_engine and step_engine not in cx.known_engines:
        cx.warnings.append(
            f"step {step['index']:02d} ({ident}): engine {step_engine!r} is not available here; "
            f"it runs on {cx.engine}" + (f" without model {step_model!r}" if step_model else "")
        )
        step_engine, step_model = None, None
    if step_engine:
        step["engine"] = step_engine
    if step_model:
        step["model"] = step_model
        step["qa"]["model"] = step_model


def _loop_fields(cx: _Context, step: dict[str, Any], call: _Source) -> str:
    """A loop module: a full-QA gate that sends the run back `steps` steps on a failed verdict."""
    ident, source, opts = call
    i = step["index"]
    behavior = source["behavior"]
    back = opts.get("loopSteps", behavior.get("steps", 1))
    iterations = opts.get("loopMaxIterations", behavior.get("maxIterations"))
    if iterations is None:
        iterations = DEFAULT_LOOP_ITERATIONS
        cx.warnings.append(f"step {i:02d} ({ident}): no loopMaxIterations; bounded at {iterations}")
    if not isinstance(back, int) or isinstance(back, bool) or back < 1:
        raise CodeMachineError(
            MODULES, f"[{source['_pos']}].behavior.steps", "must be a positive integer"
        )
    iterations = min(int(iterations), 50)
    back_to = max(1, i - back)
    skip_ids = set(opts.get("loopSkip", behavior.get("skip", [])) or [])
    skip = sorted(
        k
        for k, (_fn, other, other_opts) in enumerate(cx.entries[back_to - 1 : i - 1], start=back_to)
        if other in skip_ids or other_opts.get("executeOnce")
    )
    model = step.get("model")
    step["qa"] = {"policy": "full", **({"model": model} if model else {})}
    step["loop"] = {
        "max_iterations": iterations,
        "back_to": back_to,
        "skip_steps": skip,
        "on": "qa_fail",
    }
    return (
        f"This is a loop gate: end the QA with VERDICT: FAIL to go back to step "
        f"{back_to:02d} (at most {iterations} times), VERDICT: PASS to go on."
    )


def _module_fields(cx: _Context, step: dict[str, Any], call: _Source) -> list[str]:
    """A module becomes a review step: a loop gate, or a trigger that enqueues another step."""
    ident, source, opts = call
    step["step_type"] = "review"
    step["commit_type"] = "chore"
    if source["behavior"]["type"] == "loop":
        return [_loop_fields(cx, step, call)]
    target = _trigger_target(cx.ws, ident, opts)
    if not target:
        cx.warnings.append(
            f"step {step['index']:02d} ({ident}): trigger module without triggerAgentId"
        )
        return []
    step["triggers"] = [{"on": "pass", "step": cx.first_index[target], "mode": "enqueue"}]
    return [f"When this step passes, step {cx.first_index[target]:02d} ({target}) runs."]


def depends_on(value: Any, first_index: Mapping[str, int], file: str, i: int) -> list[int] | None:
    """A step's `dependsOn` (agent ids, or step numbers) as step indexes; None when not given
    (the step then follows the previous one, as CodeMachine runs them)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for k, item in enumerate(items):
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and item in first_index:
            out.append(first_index[item])
        else:
            raise CodeMachineError(file, f"steps[{i - 1}].dependsOn[{k}]", f"unknown step {item!r}")
    return out


def map_step(
    cx: _Context, index: int, entry: Entry, used_slugs: set[str]
) -> tuple[dict[str, Any], str]:
    """One workflow entry → its spec step and the text of its step file."""
    function, ident, opts = entry
    is_module = function == "resolveModule"
    source = cx.ws.modules[ident] if is_module else cx.ws.main_agents[ident]
    slug = _unique_slug(ident, index, used_slugs)
    file = step_file_name(index, slug)
    title = str(opts.get("agentName") or source.get("name") or ident)[:200]
    call = _Source(ident, source, opts)
    found: list[str] = []
    prompt_text = "\n\n".join(
        _fill_placeholders(cx.ws, cx.ws.files[p], found).strip() for p in source["_prompts"]
    )
    step: dict[str, Any] = {
        "index": index,
        "slug": slug,
        "title": title,
        "file": file,
        "step_type": "work",
        "commit_type": "feat",
        "qa": {"policy": cx.qa_policy},
        "outputs": {"protocol": f"{cx.base}/{file}"},
    }
    depends = depends_on(
        opts.get("dependsOn", source.get("dependsOn")), cx.first_index, cx.workflow_file, index
    )
    if depends is not None:
        step["depends_on"] = depends
    _engine_fields(cx, step, call)
    notes: list[str] = []
    if opts.get("notCompletedFallback"):
        notes.append(
            f"If this step cannot be completed, CodeMachine would hand over to "
            f"`{opts['notCompletedFallback']}`; here the step fails and the protocol blocks for a "
            "human."
        )
    if is_module:
        notes += _module_fields(cx, step, call)
    outputs = sorted(set(found))
    if outputs:
        step["outputs"]["extra"] = outputs
    return step, _step_file(title, ident, source, prompt_text, notes, outputs)


def build_import(
    ws: Workspace,
    workflow_file: str,
    protocol: str,
    *,
    engine: str,
    known_engines: set[str],
    qa_policy: str = "light",
) -> ImportPlan:
    """The ProtocolSpec (validated) and the files for one workflow of the workspace (pure)."""
    template = ws.workflows[workflow_file]
    entries, first_index, warnings = plan_entries(ws, workflow_file)
    cx = _Context(
        ws,
        protocol_dir(protocol),
        engine,
        known_engines,
        qa_policy,
        entries,
        first_index,
        warnings,
        workflow_file=workflow_file,
    )
    steps: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    used_slugs: set[str] = set()
    for i, entry in enumerate(entries, start=1):
        step, text = map_step(cx, i, entry, used_slugs)
        steps.append(step)
        files[f"{cx.base}/{step['file']}"] = text
    spec_data: dict[str, Any] = {
        "version": 1,
        "protocol": protocol,
        "task": task_of(ws, template),
        "engine": engine,
        "qa_policy": qa_policy,
        "source": "codemachine",
        "steps": steps,
    }
    spec_dict = spec_to_dict(
        validate_spec(spec_data)
    )  # schema + cross-field rules; SpecError names the JSON path
    files.update(_protocol_files(ws, template, workflow_file, protocol, spec_dict, cx.warnings))
    if SPECIFICATIONS in ws.files:
        files[SPECIFICATIONS] = ws.files[SPECIFICATIONS]
    return ImportPlan(spec=spec_dict, files=files, workflow=workflow_file, warnings=cx.warnings)


def task_of(ws: Workspace, template: Mapping[str, Any]) -> str:
    spec_text = ws.files.get(SPECIFICATIONS, "")
    for line in spec_text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:2000]
    return f"CodeMachine workflow: {template['name']}"[:2000]


def _step_file(
    title: str,
    ident: str,
    source: Mapping[str, Any],
    prompt: str,
    notes: list[str],
    outputs: list[str],
) -> str:
    parts = [f"# {title}", "", f"Imported from CodeMachine `{ident}`."]
    if source.get("description"):
        parts += ["", str(source["description"])]
    if outputs:
        parts += ["", "## Outputs", "", *[f"- `{o}`" for o in outputs]]
    if notes:
        parts += ["", "## How this step runs here", "", *[f"- {n}" for n in notes]]
    parts += ["", "## Instructions", "", prompt, "", "## Notes", ""]
    return "\n".join(parts) + "\n"


def _protocol_files(
    ws: Workspace,
    template: Mapping[str, Any],
    workflow_file: str,
    protocol: str,
    spec: Mapping[str, Any],
    warnings: list[str],
) -> dict[str, str]:
    base = protocol_dir(protocol)
    step_lines = [f"{s['index']:02d}. {s['title']} (`{s['file']}`)" for s in spec["steps"]]
    plan = "\n".join(
        [
            f"# Plan for {protocol}",
            "",
            f"Imported from the CodeMachine workflow **{template['name']}** (`{workflow_file}`).",
            "",
            "## Goal",
            "",
            spec["task"],
            "",
            "## Steps",
            "",
            *step_lines,
            "",
        ]
    )
    subs = []
    for sub_id in template.get("subAgentIds", []):
        sub = ws.sub_agents[sub_id]
        line = f"- `{sub_id}`: {sub.get('name') or sub_id}"
        if sub.get("description"):
            line += f" — {sub['description']}"
        subs.append(line)
        for path in sub.get("_prompts", []):
            subs.append(f"  (prompt: `{path}`)")
    context_parts = ["# Context", ""]
    if SPECIFICATIONS in ws.files:
        context_parts += [f"The specification is in `{SPECIFICATIONS}`.", ""]
    if subs:
        context_parts += ["## Sub-agents available to the steps", "", *subs, ""]
    log = (
        "# Log\n\n- Imported from CodeMachine workflow "
        + f"{template['name']!r}.\n"
        + "".join(f"- Warning: {w}\n" for w in warnings)
    )
    setup = "# Setup\n\nNothing to install for the import itself; steps set up what they need.\n"
    return {
        f"{base}/plan.md": plan,
        f"{base}/context.md": "\n".join(context_parts),
        f"{base}/log.md": log,
        f"{base}/00-setup.md": setup,
        f"{base}/spec.json": json.dumps(spec, indent=2) + "\n",
    }
