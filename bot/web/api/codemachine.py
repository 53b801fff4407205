"""POST /api/projects/{id}/codemachine/import: a CodeMachine workspace becomes a protocol run."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.codemachine.importer import import_workspace
from bot.web.api.bodies import CodeMachineImport
from bot.web.api.core import _path_id, _state, guarded, read_model
from bot.web.api.resources import _load_project


@guarded
async def codemachine_import(request: Request) -> Response:
    """Import a CodeMachine workspace (files in the body) as a new protocol run of the project.

    201 with the run; 422 naming the file and field of a malformed workspace (a SpecError, which
    `guarded` answers with the errors as detail); nothing is written before the workspace validates.
    """
    project_id = _path_id(request, "project_id", "project")
    body = await read_model(request, CodeMachineImport)
    project = await _load_project(request, project_id)
    ctx = await _state(request).services_ctx()
    run, plan = await import_workspace(
        ctx, project, body.files, workflow=body.workflow, engine=body.engine, auto_mode=body.auto
    )
    return JSONResponse(
        {
            "protocol_run_id": run.id,
            "protocol": run.protocol_name,
            "workflow": plan.workflow,
            "steps": [s["file"] for s in plan.spec["steps"]],
            "warnings": plan.warnings,
        },
        status_code=201,
    )
