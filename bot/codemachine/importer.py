"""Importing a CodeMachine workspace (I/O): read, map, persist the run, enqueue its branch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot import git
from bot.codemachine.mapping import ImportPlan, build_import, task_of
from bot.codemachine.parser import (
    MAX_FILE_BYTES,
    MAX_FILES,
    SKIP_DIRS,
    CodeMachineError,
    load_workspace,
    select_workflow,
)
from bot.core.errors import SpecError
from bot.domain.spec import protocol_dir, step_to_dict, validate_spec
from bot.domain.states import ProtocolStatus, StepStatus
from bot.git.names import protocol_name
from bot.jobs import catalogue as jobs
from bot.storage.models import ProtocolRun, StepRun
from bot.storage.runs import new_event, run_names


def read_workspace_dir(root: Path) -> dict[str, str]:
    """The workspace's text files (bounded); binary and huge files are skipped."""
    if not root.is_dir():
        raise CodeMachineError(str(root), "", "is not a directory")
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            files[rel.as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(files) >= MAX_FILES:
            break
    return files


# -- persisting an import: one transaction, then a job writes the branch ------------------------


async def create_imported_run(
    db: Any,
    project: Any,
    plan: ImportPlan,
    *,
    base_branch: str,
    auto_mode: bool = False,
) -> Any:
    """The run (template_source="codemachine"), its steps and an event, all in one transaction."""

    spec = validate_spec(plan.spec)
    async with db.sessions.begin() as session:
        run = ProtocolRun(
            project_id=project.id,
            protocol_name=spec.protocol,
            status=ProtocolStatus.PENDING,
            base_branch=base_branch,
            description=spec.task,
            auto_mode=auto_mode,
            approved=auto_mode,
            template_source="codemachine",
            template_config=plan.spec,
            runtime_state={
                "codemachine": {
                    "workflow": plan.workflow,
                    "files": plan.files,
                    "warnings": plan.warnings,
                }
            },
            protocol_root=protocol_dir(spec.protocol),
        )
        session.add(run)
        await session.flush()
        for step in spec.steps:
            session.add(
                StepRun(
                    protocol_run_id=run.id,
                    step_index=step.index,
                    step_name=step.file.removesuffix(".md"),
                    step_type=step.step_type,
                    status=StepStatus.PENDING,
                    engine_id=step.engine or spec.engine,
                    model=step.model,
                    policy=step_to_dict(step),
                    runtime_state={},
                    summary=step.title,
                )
            )
        session.add(
            new_event(
                "protocol.imported",
                f"protocol {spec.protocol} imported from CodeMachine workflow {plan.workflow} "
                f"({len(spec.steps)} steps)",
                project_id=project.id,
                protocol_run_id=run.id,
                metadata={
                    "workflow": plan.workflow,
                    "warnings": plan.warnings,
                    "source": "codemachine",
                },
            )
        )
        return run


async def import_workspace(
    ctx: dict[str, Any],
    project: Any,
    files: Mapping[str, str],
    *,
    workflow: str | None = None,
    engine: str | None = None,
    auto_mode: bool = False,
) -> tuple[Any, ImportPlan]:
    """Parse, map, validate and persist a workspace as a new run; enqueue writing its branch.

    Everything that can be wrong with the workspace is found before the database is touched.
    """
    from sqlalchemy.exc import IntegrityError

    settings = ctx["settings"]
    ws = load_workspace(files)
    workflow_file = select_workflow(ws, workflow)
    chosen_engine = engine or settings.engine
    known = set(ctx["engines"].ids()) if "engines" in ctx else {chosen_engine}
    if chosen_engine not in known:
        raise SpecError(
            f"unknown engine {chosen_engine!r}", errors=[f"engine: unknown {chosen_engine!r}"]
        )
    task = task_of(ws, ws.workflows[workflow_file])
    # validate once with a placeholder number so a bad workspace never reaches git or the database
    build_import(
        ws, workflow_file, protocol_name(1, task), engine=chosen_engine, known_engines=known
    )
    forge = ctx["forges"].forge_for(project)
    auth = await forge.git_auth_header(ctx["forges"].repo_ref(project))
    mirror = await ctx["git"].ensure_mirror(project.git_url, auth)
    for _ in range(20):
        number = await git.next_protocol_number(
            mirror, project.base_branch, await run_names(ctx["db"], project.id)
        )
        plan = build_import(
            ws,
            workflow_file,
            protocol_name(number, task),
            engine=chosen_engine,
            known_engines=known,
        )
        try:
            run = await create_imported_run(
                ctx["db"], project, plan, base_branch=project.base_branch, auto_mode=auto_mode
            )
            break
        except IntegrityError:  # another request took this number first; nothing was written
            continue
    else:  # pragma: no cover - 20 collisions in a row means something else is wrong
        raise SpecError("could not allocate a protocol number", errors=["protocol: busy"])

    await jobs.submit(ctx["redis"], jobs.codemachine_prepare(run.id))
    return run, plan
