"""The protocol's spec as the step jobs read it: the validated plan, one step of it, its prompt values.

Below execute, quality, integrate and advance, which all read it, so none of them imports another
for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.runs import RunState
from bot.spec import ProtocolSpec, StepSpec, validate_spec


def spec_of(state: RunState) -> ProtocolSpec:
    return validate_spec(state.run.template_config)


def step_spec_of(spec: ProtocolSpec, step_index: int) -> StepSpec:
    return next(s for s in spec.steps if s.index == step_index)


def step_values(state: RunState, step_spec: StepSpec, root: Path) -> dict[str, Any]:
    """The placeholders every step prompt (execute, QA) shares."""
    name = state.run.protocol_name
    return {
        "protocol": name,
        "protocol_dir": f".protocols/{name}",
        "task": state.run.description,
        "extra_instructions": "",
        "step_index": step_spec.index,
        "step_title": step_spec.title,
        "step_file": step_spec.file,
        "step_content": read(root / step_spec.file),
    }


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
