"""The protocol's spec as the step jobs read it: the validated plan, one step of it, its prompt
values.

Below execute, quality, integrate and advance, which all read it, so none of them imports another
for it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from bot.domain.spec import ProtocolSpec, StepSpec, validate_spec
from bot.storage.runs import RunState

# A step's jobs read the spec several times; JSON Schema validation of a 20-step spec costs
# ~13 ms in pure Python, about a sixth of the bot's own time per step. The spec is immutable
# (frozen dataclasses), so the validated result is kept per exact stored text: a spec that
# changes (a review fix step appended, a replan) is a new key and is validated again.
_SPECS: OrderedDict[str, ProtocolSpec] = OrderedDict()
_SPECS_MAX = 128


def spec_of(state: RunState) -> ProtocolSpec:
    config = state.run.template_config
    try:
        key = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # not JSON: let validation say what is wrong with it
        return validate_spec(config)
    found = _SPECS.get(key)
    if found is not None:
        _SPECS.move_to_end(key)
        return found
    spec = validate_spec(config)  # raises on an invalid spec: nothing is cached then
    _SPECS[key] = spec
    if len(_SPECS) > _SPECS_MAX:
        _SPECS.popitem(last=False)
    return spec


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
