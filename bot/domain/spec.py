"""ProtocolSpec/StepSpec models, their validation, and engine/model resolution (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator

from bot.core.errors import SpecError
from bot.domain.graph import graph_errors, resolve_dependencies, unsupported_in_graph

QAPolicy = Literal["skip", "light", "full"]
Phase = Literal["planning", "decompose", "execute", "qa"]
LoopOn = Literal["qa_fail", "ci_fail", "always"]
TriggerOn = Literal["pass", "fail", "complete"]
TriggerMode = Literal["enqueue", "inline"]
SpecSource = Literal["planning", "codemachine", "api"]

SPEC_VERSION = 1
DEFAULT_EXECUTE_PROMPT = "execute-step"
DEFAULT_QA_PROMPT = "quality-validator"
DEFAULT_MAX_INLINE_DEPTH = 3
DEFAULT_ENGINE = "codex"
# Last resort when nothing (step, protocol, project, settings) names a model.
BUILTIN_MODEL = "gpt-5.5"
PHASES: tuple[Phase, ...] = ("planning", "decompose", "execute", "qa")


def schemas_dir() -> Path:
    """The repository's schemas/ directory."""
    return Path(__file__).resolve().parents[2] / "schemas"


def protocol_dir(protocol: str) -> str:
    """Where a protocol's files live on its branch."""
    return f".protocols/{protocol}"


@dataclass(frozen=True)
class ModelsSpec:
    """Per-phase models for the whole protocol (None = resolve further down the chain)."""

    planning: str | None = None
    decompose: str | None = None
    execute: str | None = None
    qa: str | None = None

    def for_phase(self, phase: Phase) -> str | None:
        """The model this spec names for `phase`."""
        value: str | None = getattr(self, phase)
        return value


@dataclass(frozen=True)
class QASpec:
    """A step's QA gate. Always concrete on a StepSpec: a missing block inherits the protocol's."""

    policy: QAPolicy
    prompt: str = DEFAULT_QA_PROMPT
    engine: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class LoopSpec:
    """Go back to `back_to` (resetting steps back_to..this one except `skip_steps`) on `on`."""

    max_iterations: int
    back_to: int
    skip_steps: tuple[int, ...] = ()
    on: LoopOn = "qa_fail"


@dataclass(frozen=True)
class TriggerSpec:
    """After this step's `on` outcome, run step `step` inline or as a new job."""

    on: TriggerOn
    step: int
    mode: TriggerMode = "enqueue"


@dataclass(frozen=True)
class OutputsSpec:
    """Files a step is expected to write: one under the protocol dir, plus repository paths."""

    protocol: str
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepSpec:
    """How one step runs."""

    index: int
    slug: str
    title: str
    file: str
    qa: QASpec
    outputs: OutputsSpec
    step_type: str = "work"
    engine: str | None = None
    model: str | None = None
    prompt: str = DEFAULT_EXECUTE_PROMPT
    commit_type: str = "feat"
    loop: LoopSpec | None = None
    triggers: tuple[TriggerSpec, ...] = ()
    max_tokens: int | None = None
    # the steps this one waits for; None = the previous step (a plan without a graph is a chain)
    depends_on: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ProtocolSpec:
    """How a protocol run is executed; stored on ProtocolRun.template_config."""

    protocol: str
    task: str
    engine: str
    steps: tuple[StepSpec, ...]
    models: ModelsSpec = field(default_factory=ModelsSpec)
    qa_policy: QAPolicy = "full"
    max_inline_depth: int = DEFAULT_MAX_INLINE_DEPTH
    max_tokens: int | None = None
    source: SpecSource = "planning"
    version: int = SPEC_VERSION

    def step(self, index: int) -> StepSpec:
        """The step with `index`; KeyError if there is none."""
        for s in self.steps:
            if s.index == index:
                return s
        raise KeyError(index)

    @property
    def number(self) -> int:
        """The protocol number (the NNNN of NNNN-task)."""
        return int(self.protocol.split("-", 1)[0])

    def dependencies(self) -> dict[int, tuple[int, ...]]:
        """Each step's dependencies, the default (previous step) filled in (bot/domain/graph.py)."""
        return resolve_dependencies([(s.index, s.depends_on) for s in self.steps])


@dataclass(frozen=True)
class PlannedStep:
    """One step of the planning engine's output."""

    slug: str
    title: str
    content: str
    commit_type: str
    qa_policy: QAPolicy
    # at most this many automatic fix attempts (the planner may only lower the bound)
    max_fix_attempts: int | None = None
    depends_on: tuple[int, ...] | None = None  # step numbers (1 = first); None = the previous step


@dataclass(frozen=True)
class PlanningOutput:
    """The planning engine's validated output (schemas/protocol-planning.schema.json)."""

    title: str
    plan: str
    context: str
    log: str
    setup: str
    steps: tuple[PlannedStep, ...]


@dataclass(frozen=True)
class SpecDefaults:
    """Project/settings defaults used when building a spec from planning output."""

    engine: str = DEFAULT_ENGINE
    models: Mapping[str, str] = field(default_factory=dict)
    qa_policy: QAPolicy = "full"
    max_inline_depth: int = DEFAULT_MAX_INLINE_DEPTH
    max_tokens: int | None = None
    step_max_tokens: int | None = None
    execute_prompt: str = DEFAULT_EXECUTE_PROMPT
    qa_prompt: str = DEFAULT_QA_PROMPT
    # automatic fix attempts per step on QA FAIL or red CI (repository policy, else environment)
    fix_attempts: int = 2
    # the repository's QA policy: replaces the planner's per-step choice when set
    repo_qa_policy: QAPolicy | None = None


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    path = schemas_dir() / schema_name
    schema = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _message(error: Any) -> str:
    # A raw regex says little to the person who wrote the spec; say what the pattern means.
    if (
        error.validator == "pattern"
        and isinstance(error.schema, dict)
        and "description" in error.schema
    ):
        return f"{error.instance!r} is not {error.schema['description']}"
    return str(error.message)


def _schema_errors(schema_name: str, data: Any) -> list[str]:
    errors = _validator(schema_name).iter_errors(data)
    return sorted(f"{e.json_path}: {_message(e)}" for e in errors)


def _raise(what: str, errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(f"{what} is invalid: {errors[0]}{more}", errors=errors)


def _semantic_errors(data: Mapping[str, Any]) -> list[str]:
    """Rules JSON Schema cannot say: unique indexes, file numbers, targets, output paths."""
    errors: list[str] = []
    steps: list[Mapping[str, Any]] = data["steps"]
    indexes = [s["index"] for s in steps]
    known = set(indexes)
    seen: dict[int, int] = {}
    prefix = protocol_dir(data["protocol"]) + "/"
    for pos, step in enumerate(steps):
        at = f"$.steps[{pos}]"
        idx = step["index"]
        if idx in seen:
            errors.append(f"{at}.index: duplicate step index {idx} (also $.steps[{seen[idx]}])")
        seen.setdefault(idx, pos)
        number = int(step["file"].split("-", 1)[0])
        if number != idx:
            errors.append(
                f"{at}.file: {step['file']!r} is numbered {number}, but the step index is {idx}"
            )
        out = step.get("outputs", {}).get("protocol")
        if out is not None and not out.startswith(prefix):
            errors.append(f"{at}.outputs.protocol: {out!r} is not under {prefix!r}")
        loop = step.get("loop")
        if loop is not None:
            back_to = loop.get("back_to", idx)
            if back_to not in known:
                errors.append(f"{at}.loop.back_to: no step with index {back_to}")
            elif back_to > idx:
                errors.append(
                    f"{at}.loop.back_to: {back_to} is after this step ({idx}); a loop goes back"
                )
            for k, skip in enumerate(loop.get("skip_steps", [])):
                if skip not in known:
                    errors.append(f"{at}.loop.skip_steps[{k}]: no step with index {skip}")
        for k, trig in enumerate(step.get("triggers", [])):
            if trig["step"] not in known:
                errors.append(f"{at}.triggers[{k}].step: no step with index {trig['step']}")
    if not errors:  # a graph over duplicate indexes means nothing
        errors += graph_errors([(s["index"], s.get("depends_on")) for s in steps])
    if not errors:  # loops and triggers of a graph would be silently ignored: refused
        errors += unsupported_in_graph(steps)
    return sorted(errors)


def _step_from_dict(d: Mapping[str, Any], protocol: str, qa_default: QAPolicy) -> StepSpec:
    qa = d.get("qa")
    loop = d.get("loop")
    outputs = d.get("outputs", {})
    return StepSpec(
        index=d["index"],
        slug=d["slug"],
        title=d["title"],
        file=d["file"],
        step_type=d.get("step_type", "work"),
        engine=d.get("engine"),
        model=d.get("model"),
        prompt=d.get("prompt", DEFAULT_EXECUTE_PROMPT),
        commit_type=d.get("commit_type", "feat"),
        outputs=OutputsSpec(
            protocol=outputs.get("protocol", f"{protocol_dir(protocol)}/{d['file']}"),
            extra=tuple(outputs.get("extra", ())),
        ),
        qa=QASpec(
            policy=qa["policy"],
            prompt=qa.get("prompt", DEFAULT_QA_PROMPT),
            engine=qa.get("engine"),
            model=qa.get("model"),
        )
        if qa is not None
        else QASpec(policy=qa_default),
        loop=LoopSpec(
            max_iterations=loop["max_iterations"],
            back_to=loop.get("back_to", d["index"]),
            skip_steps=tuple(loop.get("skip_steps", ())),
            on=loop.get("on", "qa_fail"),
        )
        if loop is not None
        else None,
        triggers=tuple(
            TriggerSpec(on=t["on"], step=t["step"], mode=t.get("mode", "enqueue"))
            for t in d.get("triggers", ())
        ),
        max_tokens=d.get("max_tokens"),
        depends_on=tuple(d["depends_on"]) if d.get("depends_on") is not None else None,
    )


def validate_spec(data: Any) -> ProtocolSpec:
    """Validate a ProtocolSpec mapping (schema, then cross-field rules) and build it.

    Raises SpecError whose `errors` are `"$.json.path: message"` strings.
    """
    _raise("protocol spec", _schema_errors("protocol-spec.schema.json", data))
    _raise("protocol spec", _semantic_errors(data))
    qa_default: QAPolicy = data.get("qa_policy", "full")
    models = data.get("models", {})
    return ProtocolSpec(
        version=data["version"],
        protocol=data["protocol"],
        task=data["task"],
        engine=data["engine"],
        models=ModelsSpec(**{p: models.get(p) for p in PHASES}),
        qa_policy=qa_default,
        max_inline_depth=data.get("max_inline_depth", DEFAULT_MAX_INLINE_DEPTH),
        max_tokens=data.get("max_tokens"),
        source=data.get("source", "planning"),
        steps=tuple(_step_from_dict(s, data["protocol"], qa_default) for s in data["steps"]),
    )


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def step_to_dict(step: StepSpec) -> dict[str, Any]:
    """A StepSpec as schema-valid JSON data (every default written out)."""
    out: dict[str, Any] = {
        "index": step.index,
        "slug": step.slug,
        "title": step.title,
        "file": step.file,
        "step_type": step.step_type,
        "engine": step.engine,
        "model": step.model,
        "prompt": step.prompt,
        "commit_type": step.commit_type,
        "outputs": {"protocol": step.outputs.protocol, "extra": list(step.outputs.extra)},
        "qa": _drop_none(
            {
                "policy": step.qa.policy,
                "prompt": step.qa.prompt,
                "engine": step.qa.engine,
                "model": step.qa.model,
            }
        ),
        "max_tokens": step.max_tokens,
        "depends_on": list(step.depends_on) if step.depends_on is not None else None,
    }
    if step.loop is not None:
        out["loop"] = {
            "max_iterations": step.loop.max_iterations,
            "back_to": step.loop.back_to,
            "skip_steps": list(step.loop.skip_steps),
            "on": step.loop.on,
        }
    if step.triggers:
        out["triggers"] = [{"on": t.on, "step": t.step, "mode": t.mode} for t in step.triggers]
    return _drop_none(out)


def spec_to_dict(spec: ProtocolSpec) -> dict[str, Any]:
    """A ProtocolSpec as JSON data for ProtocolRun.template_config; `validate_spec` reads it
    back."""
    models = _drop_none({p: spec.models.for_phase(p) for p in PHASES})
    return _drop_none(
        {
            "version": spec.version,
            "protocol": spec.protocol,
            "task": spec.task,
            "engine": spec.engine,
            "models": models,
            "qa_policy": spec.qa_policy,
            "max_inline_depth": spec.max_inline_depth,
            "max_tokens": spec.max_tokens,
            "source": spec.source,
            "steps": [step_to_dict(s) for s in spec.steps],
        }
    )


def validate_planning_output(data: Any) -> PlanningOutput:
    """Validate the planning engine's JSON reply; SpecError with JSON-path errors otherwise."""
    data = _with_default_dependencies(_with_planning_defaults(data))
    errors = _schema_errors("protocol-planning.schema.json", data)
    if not errors:
        errors += graph_errors(
            [(pos, s["depends_on"]) for pos, s in enumerate(data["steps"], start=1)]
        )
        first_seen: dict[str, int] = {}
        for pos, step in enumerate(data["steps"]):
            slug = step["slug"]
            if slug in first_seen:
                errors.append(
                    f"$.steps[{pos}].slug: duplicate slug {slug!r} "
                    f"(also $.steps[{first_seen[slug]}])"
                )
            first_seen.setdefault(slug, pos)
    _raise("planning output", errors)
    return PlanningOutput(
        title=data["title"],
        plan=data["plan"],
        context=data["context"],
        log=data["log"],
        setup=data["setup"],
        steps=tuple(
            PlannedStep(
                slug=s["slug"],
                title=s["title"],
                content=s["content"],
                commit_type=s["commit_type"],
                qa_policy=s["qa_policy"],
                max_fix_attempts=s.get("max_fix_attempts"),
                depends_on=tuple(s["depends_on"]) if s["depends_on"] is not None else None,
            )
            for s in data["steps"]
        ),
    )


def _with_planning_defaults(data: Any) -> Any:
    """A reply without `max_fix_attempts` (written for the schema before it had the key) gets
    null there, which means "the default bound"; nothing else is filled in."""
    if not isinstance(data, Mapping) or not isinstance(data.get("steps"), list):
        return data
    steps = [
        {**s, "max_fix_attempts": None}
        if isinstance(s, Mapping) and "max_fix_attempts" not in s
        else s
        for s in data["steps"]
    ]
    return {**data, "steps": steps}


def _with_default_dependencies(data: Any) -> Any:
    """The reply with `depends_on: null` where a step left it out.

    The schema lists it as required (Codex's strict output mode wants every property required),
    but a reply without it is a chain, as every plan was before graphs: it is read as null.
    """
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return data
    steps = [{"depends_on": None, **s} if isinstance(s, dict) else s for s in data["steps"]]
    return {**data, "steps": steps}


def step_file_name(index: int, slug: str) -> str:
    """`NN-slug.md` (00 is the setup file)."""
    return f"{index:02d}-{slug}.md"


SETUP_FILE = "00-setup.md"


def _from_maps(phase: Phase, *maps: Mapping[str, str] | None) -> str | None:
    # A map may name a model per phase or give a "default" for every phase.
    for m in maps:
        if m:
            value = m.get(phase) or m.get("default")
            if value:
                return value
    return None


def resolve_model(
    phase: Phase,
    step_spec: StepSpec | None,
    protocol_spec: ProtocolSpec | None,
    project_default_models: Mapping[str, str] | None,
    settings_models: Mapping[str, str] | None,
    builtin_fallback: str = BUILTIN_MODEL,
) -> str:
    """The model for `phase`: step → protocol → project defaults → settings → builtin.

    At step level, execute uses `step.model` and qa uses `step.qa.model` (a big execute model
    does not leak into QA); planning and decompose have no step-level model. Project and
    settings maps are keyed by phase, with "default" as a catch-all.
    """
    if step_spec is not None:
        if phase == "execute" and step_spec.model:
            return step_spec.model
        if phase == "qa" and step_spec.qa.model:
            return step_spec.qa.model
    if protocol_spec is not None:
        value = protocol_spec.models.for_phase(phase)
        if value:
            return value
    return _from_maps(phase, project_default_models, settings_models) or builtin_fallback


def resolve_engine(
    phase: Phase,
    step_spec: StepSpec | None,
    protocol_spec: ProtocolSpec | None,
    project_default_engine: str | None,
    settings_engine: str = DEFAULT_ENGINE,
) -> str:
    """The engine id: step (qa: step.qa.engine, then step.engine) → protocol → project →
    settings."""
    if step_spec is not None and phase in ("execute", "qa"):
        if phase == "qa" and step_spec.qa.engine:
            return step_spec.qa.engine
        if step_spec.engine:
            return step_spec.engine
    if protocol_spec is not None and protocol_spec.engine:
        return protocol_spec.engine
    return project_default_engine or settings_engine
