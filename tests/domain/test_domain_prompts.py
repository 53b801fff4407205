"""Prompt templates: built-ins render, overrides are checked strictly."""

from __future__ import annotations

import pytest

from bot.errors import SpecError
from bot.prompts import (
    ALL_PLACEHOLDERS,
    PROMPT_PLACEHOLDERS,
    builtin_prompt,
    prompt_placeholders,
    prompts_dir,
    render_prompt,
)

VALUES = {name: f"<{name}>" for name in ALL_PLACEHOLDERS}


@pytest.mark.parametrize("name", sorted(PROMPT_PLACEHOLDERS))
def test_builtin_prompts_render(name: str) -> None:
    assert (prompts_dir() / f"{name}.md").is_file()
    text = render_prompt(name, VALUES)
    assert "$" not in text
    assert "<protocol>" in text


def test_every_builtin_file_is_registered() -> None:
    assert {p.stem for p in prompts_dir().glob("*.md")} == set(PROMPT_PLACEHOLDERS)


def test_qa_prompt_demands_the_verdict_line() -> None:
    text = render_prompt("quality-validator", VALUES)
    lines = text.splitlines()
    assert "VERDICT: PASS" in lines and "VERDICT: FAIL" in lines
    assert "<report_file>" in text


def test_values_are_not_reinterpreted() -> None:
    values = dict(VALUES, task="costs $5 and ${protocol} $$")
    assert "costs $5 and ${protocol} $$" in render_prompt("execute-step", values)


def test_override_text() -> None:
    out = render_prompt("execute-step", {"step_title": "Model", "extra": "unused"}, "Do $step_title for $$5.")
    assert out == "Do Model for $5."


@pytest.mark.parametrize(
    ("name", "values", "override", "fragment"),
    [
        ("execute-step", VALUES, "Hi $nonsense", "unknown placeholder(s) $nonsense"),
        ("planning", VALUES, "uses $step_title", "unknown placeholder(s) $step_title"),
        ("execute-step", {}, "Do $step_title", "no value for $step_title"),
        ("execute-step", VALUES, "costs $ 5", "not a placeholder"),
        ("no-such-prompt", VALUES, None, "no prompt named 'no-such-prompt'"),
        ("../etc/passwd", VALUES, None, "invalid prompt name"),
        ("Execute-Step", VALUES, None, "invalid prompt name"),
    ],
)
def test_prompt_errors(name: str, values: dict[str, str], override: str | None, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        render_prompt(name, values, override)
    assert fragment in str(info.value)
    assert info.value.errors


def test_override_errors_name_the_repository_file() -> None:
    with pytest.raises(SpecError) as info:
        render_prompt("planning", VALUES, "$bogus")
    assert str(info.value).startswith(".deksdenflow/prompts/planning.md:")


def test_custom_prompt_needs_override_and_may_use_any_known_placeholder() -> None:
    assert builtin_prompt("review-step") is None
    assert prompt_placeholders("review-step") == ALL_PLACEHOLDERS
    assert render_prompt("review-step", VALUES, "Review $step_file ($changes)") == "Review <step_file> (<changes>)"
