"""ProtocolSpec schema and models, planning-output validation, engine/model resolution."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from bot.core.errors import SpecError
from bot.domain.planning import spec_from_planning
from bot.domain.spec import (
    BUILTIN_MODEL,
    ModelsSpec,
    PlanningOutput,
    ProtocolSpec,
    SpecDefaults,
    StepSpec,
    schemas_dir,
    spec_to_dict,
    validate_planning_output,
    validate_spec,
)
from bot.domain.spec import resolve_engine as engine_for
from bot.domain.spec import resolve_model as model_for


def minimal() -> dict[str, Any]:
    return {
        "version": 1,
        "protocol": "0001-add-login",
        "task": "Add a login page",
        "engine": "codex",
        "steps": [
            {"index": 1, "slug": "model", "title": "User model", "file": "01-model.md"},
            {"index": 2, "slug": "view", "title": "Login view", "file": "02-view.md"},
        ],
    }


def full() -> dict[str, Any]:
    d = minimal()
    d.update(
        models={"planning": "big", "execute": "mid", "qa": "small"},
        qa_policy="light",
        max_inline_depth=2,
        max_tokens=100_000,
        source="codemachine",
    )
    d["steps"][0].update(
        step_type="setup",
        engine="scripted",
        model="step-model",
        prompt="custom-step",
        commit_type="chore",
        outputs={"protocol": ".protocols/0001-add-login/notes/01.md", "extra": ["src/user.py"]},
        qa={"policy": "skip"},
        max_tokens=5_000,
        triggers=[{"on": "complete", "step": 2, "mode": "inline"}],
    )
    d["steps"][1].update(
        qa={"policy": "full", "prompt": "strict-qa", "engine": "codex", "model": "qa-model"},
        loop={"max_iterations": 2, "back_to": 1, "skip_steps": [1], "on": "qa_fail"},
        triggers=[{"on": "fail", "step": 1}],
    )
    return d


def test_schema_files_are_valid_draft_2020_12() -> None:
    for name in ("protocol-spec.schema.json", "protocol-planning.schema.json"):
        Draft202012Validator.check_schema(json.loads((schemas_dir() / name).read_text()))


def test_minimal_spec_gets_defaults() -> None:
    spec = validate_spec(minimal())
    assert spec.protocol == "0001-add-login"
    assert spec.number == 1
    assert spec.qa_policy == "full"
    assert spec.max_inline_depth == 3
    assert spec.source == "planning"
    assert spec.models == ModelsSpec()
    step = spec.step(2)
    assert step.prompt == "execute-step"
    assert step.step_type == "work"
    assert step.commit_type == "feat"
    assert step.qa.policy == "full"  # inherited from the protocol
    assert step.qa.prompt == "quality-validator"
    assert step.outputs.protocol == ".protocols/0001-add-login/02-view.md"
    assert step.loop is None and step.triggers == ()
    with pytest.raises(KeyError):
        spec.step(9)


def test_full_spec_round_trips() -> None:
    spec = validate_spec(full())
    s1, s2 = spec.steps
    assert s1.engine == "scripted" and s1.qa.policy == "skip"
    assert s1.outputs.extra == ("src/user.py",)
    assert s1.triggers[0].mode == "inline"
    assert s2.qa.model == "qa-model"
    assert s2.loop is not None and s2.loop.skip_steps == (1,) and s2.loop.back_to == 1
    assert s2.triggers[0].mode == "enqueue"
    assert validate_spec(spec_to_dict(spec)) == spec
    assert validate_spec(spec_to_dict(validate_spec(minimal()))) == validate_spec(minimal())
    # Stored as JSON on the run: must survive a JSON round trip too.
    assert validate_spec(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_qa_policy_default_applies_only_to_steps_without_qa() -> None:
    d = minimal()
    d["qa_policy"] = "light"
    d["steps"][0]["qa"] = {"policy": "skip"}
    spec = validate_spec(d)
    assert [s.qa.policy for s in spec.steps] == ["skip", "light"]


def mutate(path: str, value: Any) -> dict[str, Any]:
    d = full()
    target: Any = d
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "steps.1.qa.policy",
            "sometimes",
            "$.steps[1].qa.policy: 'sometimes' is not one of ['skip', 'light', 'full']",
        ),
        ("version", 2, "$.version: 1 was expected"),
        ("protocol", "1-task", "$.protocol: '1-task' is not NNNN-kebab-case-name"),
        ("task", DELETE, "$: 'task' is a required property"),
        ("steps", [], "$.steps: [] should be non-empty"),
        ("steps.0.index", 0, "$.steps[0].index: 0 is less than the minimum of 1"),
        ("steps.0.file", "1-model.md", "$.steps[0].file: '1-model.md' is not NN-slug.md"),
        ("steps.0.slug", "Has Spaces", "$.steps[0].slug: 'Has Spaces' is not kebab-case"),
        ("steps.0.step_type", "magic", "$.steps[0].step_type: 'magic' is not one of"),
        (
            "steps.0.outputs.extra",
            ["../etc/passwd"],
            "$.steps[0].outputs.extra[0]: '../etc/passwd' is not a relative path",
        ),
        (
            "steps.0.outputs.extra",
            ["/abs"],
            "$.steps[0].outputs.extra[0]: '/abs' is not a relative path",
        ),
        (
            "steps.1.loop.max_iterations",
            0,
            "$.steps[1].loop.max_iterations: 0 is less than the minimum of 1",
        ),
        ("steps.1.loop.on", "sometimes", "$.steps[1].loop.on: 'sometimes' is not one of"),
        (
            "steps.0.triggers",
            [{"on": "pass", "step": 2, "mode": "later"}],
            "$.steps[0].triggers[0].mode: 'later' is not one of",
        ),
        (
            "steps.0.colour",
            "red",
            "$.steps[0]: Additional properties are not allowed ('colour' was unexpected)",
        ),
        ("models", {"review": "x"}, "$.models: Additional properties are not allowed"),
        ("engine", "Codex CLI", "$.engine: 'Codex CLI' does not match"),
        ("max_inline_depth", -1, "$.max_inline_depth: -1 is less than the minimum of 0"),
        (
            "steps.0.file",
            "03-model.md",
            "$.steps[0].file: '03-model.md' is numbered 3, but the step index is 1",
        ),
        ("steps.1.index", 1, "$.steps[1].index: duplicate step index 1 (also $.steps[0])"),
        ("steps.1.loop.back_to", 7, "$.steps[1].loop.back_to: no step with index 7"),
        ("steps.1.loop.skip_steps", [9], "$.steps[1].loop.skip_steps[0]: no step with index 9"),
        (
            "steps.0.triggers",
            [{"on": "pass", "step": 5}],
            "$.steps[0].triggers[0].step: no step with index 5",
        ),
        (
            "steps.0.outputs.protocol",
            "src/notes.md",
            "$.steps[0].outputs.protocol: 'src/notes.md' is not under '.protocols/0001-add-login/'",
        ),
        (
            "steps.0.outputs.protocol",
            ".protocols/0002-other/x.md",
            "is not under '.protocols/0001-add-login/'",
        ),
    ],
)
def test_spec_errors_name_the_json_path(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(mutate(path, value))
    assert any(expected in e for e in info.value.errors), info.value.errors
    assert str(info.value).startswith("protocol spec is invalid: ")


def test_loop_cannot_go_forward() -> None:
    d = full()
    d["steps"][0]["loop"] = {"max_iterations": 1, "back_to": 2}
    with pytest.raises(SpecError) as info:
        validate_spec(d)
    assert info.value.errors == [
        "$.steps[0].loop.back_to: 2 is after this step (1); a loop goes back"
    ]


def test_every_error_is_reported() -> None:
    d = full()
    d["steps"][0]["qa"]["policy"] = "never"
    d["steps"][1]["commit_type"] = "wip"
    with pytest.raises(SpecError) as info:
        validate_spec(d)
    assert len(info.value.errors) == 2
    assert "(and 1 more)" in str(info.value)


@pytest.mark.parametrize("data", [None, [], "spec", 3])
def test_non_object_spec(data: Any) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    assert info.value.errors[0].startswith("$: ")


def planning() -> dict[str, Any]:
    return {
        "title": "Login",
        "plan": "# Plan",
        "context": "ctx",
        "log": "planned",
        "setup": "# Setup",
        "steps": [
            {
                "slug": "user-model",
                "title": "Model",
                "content": "c1",
                "commit_type": "feat",
                "qa_policy": "full",
            },
            {
                "slug": "docs",
                "title": "Docs",
                "content": "c2",
                "commit_type": "docs",
                "qa_policy": "skip",
            },
        ],
    }


def test_valid_planning_output() -> None:
    out = validate_planning_output(planning())
    assert isinstance(out, PlanningOutput)
    assert out.title == "Login"
    assert [s.slug for s in out.steps] == ["user-model", "docs"]


def planning_with(path: str, value: Any) -> dict[str, Any]:
    d = planning()
    target: Any = d
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "steps.1.qa_policy",
            "sometimes",
            "$.steps[1].qa_policy: 'sometimes' is not one of ['skip', 'light', 'full']",
        ),
        ("steps.0.slug", "Bad Slug", "$.steps[0].slug: 'Bad Slug' does not match"),
        ("steps.0.commit_type", "wip", "$.steps[0].commit_type: 'wip' is not one of"),
        ("plan", "", "$.plan: '' should be non-empty"),
        ("setup", DELETE, "$: 'setup' is a required property"),
        ("steps", [], "$.steps: [] should be non-empty"),
        ("extra", 1, "$: Additional properties are not allowed ('extra' was unexpected)"),
        (
            "steps.1.slug",
            "user-model",
            "$.steps[1].slug: duplicate slug 'user-model' (also $.steps[0])",
        ),
    ],
)
def test_planning_errors(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_planning_output(planning_with(path, value))
    assert any(expected in e for e in info.value.errors), info.value.errors
    assert str(info.value).startswith("planning output is invalid: ")


def test_spec_from_planning() -> None:
    out = validate_planning_output(planning())
    defaults = SpecDefaults(
        engine="scripted",
        models={"execute": "m-exec"},
        qa_policy="light",
        max_tokens=9000,
        step_max_tokens=1000,
    )
    spec = spec_from_planning("0042-login", "Add login", out, defaults)
    assert spec.protocol == "0042-login" and spec.number == 42
    assert spec.engine == "scripted"
    assert spec.models.execute == "m-exec" and spec.models.qa is None
    assert spec.max_tokens == 9000
    assert [(s.index, s.file, s.qa.policy, s.commit_type) for s in spec.steps] == [
        (1, "01-user-model.md", "full", "feat"),
        (2, "02-docs.md", "skip", "docs"),
    ]
    assert spec.steps[0].outputs.protocol == ".protocols/0042-login/01-user-model.md"
    assert spec.steps[0].max_tokens == 1000
    assert validate_spec(spec_to_dict(spec)) == spec


def test_spec_from_planning_validates_the_name() -> None:
    out = validate_planning_output(planning())
    with pytest.raises(SpecError):
        spec_from_planning("login", "Add login", out, None)


def test_spec_from_planning_default_defaults() -> None:
    spec = spec_from_planning("0001-x", "X", validate_planning_output(planning()))
    assert spec.engine == "codex" and spec.qa_policy == "full" and spec.max_inline_depth == 3


def spec_and_step() -> tuple[ProtocolSpec, StepSpec]:
    spec = validate_spec(full())
    return spec, spec.step(2)


@pytest.mark.parametrize(
    ("phase", "use_step", "use_spec", "project", "settings", "expected"),
    [
        (
            "execute",
            True,
            True,
            {"execute": "p"},
            {"execute": "s"},
            "mid",
        ),  # step 2 has no model → protocol
        ("qa", True, True, {}, {}, "qa-model"),  # step.qa.model wins
        ("planning", True, True, {}, {}, "big"),
        ("decompose", True, True, {"decompose": "p-dec"}, {"decompose": "s-dec"}, "p-dec"),
        ("decompose", True, True, {}, {"decompose": "s-dec"}, "s-dec"),
        ("decompose", True, True, {"default": "p-any"}, {"decompose": "s-dec"}, "p-any"),
        ("decompose", True, True, None, None, BUILTIN_MODEL),
        ("planning", False, False, {"planning": "p-plan"}, {}, "p-plan"),
        ("planning", False, False, {}, {"default": "s-any"}, "s-any"),
        ("execute", False, False, {}, {}, BUILTIN_MODEL),
    ],
)
def test_resolve_model_order(
    phase: Any, use_step: bool, use_spec: bool, project: Any, settings: Any, expected: str
) -> None:
    spec, step = spec_and_step()
    assert (
        model_for(phase, step if use_step else None, spec if use_spec else None, project, settings)
        == expected
    )


def test_resolve_model_step_level() -> None:
    spec = validate_spec(full())
    step1 = spec.step(1)
    assert model_for("execute", step1, spec, {}, {}) == "step-model"
    # The execute model of a step does not leak into its QA.
    assert model_for("qa", step1, spec, {}, {}) == "small"
    assert model_for("execute", None, None, {}, {}, builtin_fallback="fb") == "fb"


def test_resolve_engine_order() -> None:
    spec = validate_spec(full())
    s1, s2 = spec.steps
    assert engine_for("execute", s1, spec, "proj", "settings") == "scripted"
    assert engine_for("qa", s1, spec, "proj", "settings") == "scripted"  # qa falls back to step
    assert engine_for("qa", s2, spec, "proj", "settings") == "codex"  # step.qa.engine
    assert engine_for("execute", s2, spec, "proj", "settings") == "codex"  # protocol
    assert engine_for("planning", s1, spec, "proj", "settings") == "codex"  # no step level
    assert engine_for("planning", None, None, "proj", "settings") == "proj"
    assert engine_for("planning", None, None, None, "settings") == "settings"
    assert engine_for("planning", None, None, None) == "codex"


def test_spec_objects_are_immutable() -> None:
    spec = validate_spec(minimal())
    with pytest.raises(AttributeError):
        spec.engine = "x"  # type: ignore[misc]
    # validate_spec does not keep references into the caller's data.
    d = minimal()
    before = copy.deepcopy(d)
    validate_spec(d)
    assert d == before
