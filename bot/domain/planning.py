"""A freshly planned protocol's spec: the plan's steps, each with its QA policy and fix loop.

It lives apart from bot/domain/spec.py because it needs the loop policy, which is itself built on
the spec's types.
"""

from __future__ import annotations

from bot.domain.loop_policy import default_loop, fix_attempt_bound, qa_policy_for
from bot.domain.spec import (
    PHASES,
    ModelsSpec,
    OutputsSpec,
    PlanningOutput,
    ProtocolSpec,
    QASpec,
    SpecDefaults,
    StepSpec,
    protocol_dir,
    spec_to_dict,
    step_file_name,
    validate_spec,
)


def spec_from_planning(
    protocol_name: str,
    task: str,
    planning_output: PlanningOutput,
    defaults: SpecDefaults | None = None,
) -> ProtocolSpec:
    """The spec for a freshly planned protocol: steps 1..n from the plan.

    Step 00 (setup) is a file only (`SETUP_FILE`), never executed as a step. The result is run
    through `validate_spec`, so a bad protocol name or task raises SpecError here.
    """
    d = defaults or SpecDefaults()
    base = protocol_dir(protocol_name)
    steps = tuple(
        StepSpec(
            index=i,
            slug=p.slug,
            title=p.title,
            file=step_file_name(i, p.slug),
            commit_type=p.commit_type,
            prompt=d.execute_prompt,
            outputs=OutputsSpec(protocol=f"{base}/{step_file_name(i, p.slug)}"),
            qa=QASpec(policy=qa_policy_for(p.qa_policy, d.repo_qa_policy), prompt=d.qa_prompt),
            max_tokens=d.step_max_tokens,
            # every planned step gets a bounded fix loop (QA FAIL or red CI redo the step)
            loop=default_loop(i, fix_attempt_bound(p.max_fix_attempts, None, d.fix_attempts)),
            depends_on=p.depends_on,
        )
        for i, p in enumerate(planning_output.steps, start=1)
    )
    spec = ProtocolSpec(
        protocol=protocol_name,
        task=task,
        engine=d.engine,
        models=ModelsSpec(**{p: d.models.get(p) for p in PHASES}),
        qa_policy=d.repo_qa_policy or d.qa_policy,
        max_inline_depth=d.max_inline_depth,
        max_tokens=d.max_tokens,
        source="planning",
        steps=steps,
    )
    return validate_spec(spec_to_dict(spec))
