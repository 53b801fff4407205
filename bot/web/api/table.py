"""The one table of /api operations: it makes both the starlette routes and the OpenAPI document.

A route cannot exist without its description, nor a description without its route: both are
read from `OPERATIONS`, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.web.api import queues, resources
from bot.web.api.bodies import (
    ActionBody,
    CodeMachineImport,
    ProjectCreate,
    ProjectUpdate,
    ProtocolCreate,
)
from bot.web.api.codemachine import codemachine_import
from bot.web.api.core import DELIVERY_STATUSES, Endpoint
from bot.web.api.run_actions import ACTIONS, protocol_action
from bot.web.console_deliveries import redeliver
from bot.web.console_steps import transcript_api

_ID = {"type": "integer", "minimum": 1}
_PAGE = {"limit": "page size", "offset": "rows to skip"}
_STRING_PARAMS = {"status", "type", "provider", "event"}


@dataclass(frozen=True)
class Operation:
    """One /api operation: where it lives, what serves it, and what OpenAPI says of it."""

    method: str
    path: str  # OpenAPI form; `{x_id}` segments are integers, `{action}` is one of ACTIONS
    endpoint: Endpoint
    summary: str
    query: dict[str, str] = field(default_factory=dict)  # name → description
    body: type[BaseModel] | None = None
    success: int = 200

    def route_path(self) -> str:
        """The starlette path: id segments are converted (and so 404 when they are not numbers)."""
        parts = [
            f"{{{p[1:-1]}:int}}" if p.startswith("{") and p.endswith("_id}") else p
            for p in self.path.split("/")
        ]
        return "/".join(parts)


OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/api/projects", resources.list_projects, "List projects"),
    Operation(
        "post",
        "/api/projects",
        resources.create_project,
        "Create a project (secrets are write-only)",
        body=ProjectCreate,
        success=201,
    ),
    Operation("get", "/api/projects/{project_id}", resources.get_project, "Read a project"),
    Operation(
        "patch",
        "/api/projects/{project_id}",
        resources.update_project,
        "Update a project",
        body=ProjectUpdate,
    ),
    Operation(
        "post", "/api/projects/{project_id}/disable", resources.disable_project, "Disable a project"
    ),
    Operation(
        "post",
        "/api/projects/{project_id}/token",
        resources.rotate_project_token,
        "Issue or rotate the project's X-Project-Token",
        success=201,
    ),
    Operation(
        "post",
        "/api/projects/{project_id}/codemachine/import",
        codemachine_import,
        "Import a CodeMachine workspace as a protocol run",
        body=CodeMachineImport,
        success=201,
    ),
    Operation(
        "get",
        "/api/protocols",
        resources.list_protocols,
        "List protocol runs, newest first",
        {**_PAGE, "project_id": "only this project", "status": "only this status"},
    ),
    Operation(
        "post",
        "/api/protocols",
        resources.create_protocol,
        "Create a protocol run and start its planning",
        body=ProtocolCreate,
        success=201,
    ),
    Operation(
        "get", "/api/protocols/{run_id}", resources.get_protocol, "A protocol run with its steps"
    ),
    Operation(
        "get", "/api/protocols/{run_id}/steps", resources.list_steps, "The steps of a protocol run"
    ),
    Operation(
        "post",
        "/api/protocols/{run_id}/actions/{action}",
        protocol_action,
        "A guarded action: " + ", ".join(ACTIONS) + " (409 with the current status on conflict)",
        {"step": "step number for approve/run/run_qa/rerun"},
        ActionBody,
        202,
    ),
    Operation("get", "/api/steps/{step_id}", resources.get_step, "One step run"),
    Operation(
        "get",
        "/api/steps/{step_id}/transcript",
        transcript_api,
        "A step's transcript: oldest first after `after`, or the page before `before`",
        {
            "limit": "page size",
            "after": "only items after this cursor",
            "before": "only items before",
        },
    ),
    Operation(
        "get",
        "/api/events",
        resources.list_events,
        "Events; `after` tails oldest-first, else newest-first with `before`",
        {
            "limit": "page size",
            "after": "only ids above (live tail)",
            "before": "only ids below",
            "project_id": "filter",
            "protocol_run_id": "filter",
            "step_run_id": "filter",
            "type": "event type",
        },
    ),
    Operation(
        "get",
        "/api/deliveries",
        resources.list_deliveries,
        "Webhook deliveries with their outcome, newest first",
        {
            "limit": "page size",
            "before": "only ids below",
            "provider": "github|gitlab",
            "status": "|".join(DELIVERY_STATUSES),
            "event": "event name",
        },
    ),
    Operation("get", "/api/deliveries/{delivery_id}", resources.get_delivery, "One delivery"),
    Operation(
        "post",
        "/api/deliveries/{delivery_id}/redeliver",
        redeliver,
        "Run a stored delivery's handlers again",
        success=202,
    ),
    Operation(
        "get", "/api/queues", queues.queues, "Queue depth, in progress and failures per job name"
    ),
)


def _parameters(op: Operation) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in op.path.split("/") if part.startswith("{")]
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": list(ACTIONS)} if name == "action" else _ID,
        }
        for name in names
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": text,
            "schema": {"type": "string"}
            if name in _STRING_PARAMS
            else {"type": "integer", "minimum": 0},
        }
        for name, text in op.query.items()
    ]
    return params


def _responses(op: Operation) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    responses: dict[str, Any] = {
        str(op.success): {
            "description": "OK",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "400": {"description": "bad input", **error},
        "401": {"description": "missing or wrong token"},
        "403": {"description": "not allowed for this caller"},
        "404": {"description": "unknown id", **error},
        "503": {"description": "a backing service (database, queue) is unreachable"},
    }
    if op.method != "get":
        responses["409"] = {
            "description": "conflict: the current status does not allow it",
            **error,
        }
        responses["422"] = {"description": "invalid body", **error}
    return responses


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of /api, built from OPERATIONS and the pydantic bodies."""
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "error_id": {"type": "string"},
                "current": {"type": "string"},
                "detail": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["error"],
        }
    }
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        doc: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path}",
            "parameters": _parameters(op),
            "responses": _responses(op),
        }
        if op.body is not None:
            name = op.body.__name__
            schemas[name] = op.body.model_json_schema(ref_template="#/components/schemas/{model}")
            doc["requestBody"] = {
                "required": op.body is not ActionBody,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                },
            }
        paths.setdefault(op.path, {})[op.method] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": "DeksdenFlow operator API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "DEKSDENFLOW_API_TOKEN",
                },
                "projectToken": {"type": "apiKey", "in": "header", "name": "X-Project-Token"},
            },
        },
        "security": [{"bearer": []}, {"projectToken": []}],
    }


async def openapi(request: Request) -> Response:
    """The description itself is public: it holds no data."""
    return JSONResponse(build_openapi())


def api_routes() -> list[BaseRoute]:
    """The /api routes, one per OPERATIONS entry, plus the public description."""
    routes: list[BaseRoute] = [Route("/api/openapi.json", openapi, methods=["GET"])]
    routes += [
        Route(op.route_path(), op.endpoint, methods=[op.method.upper()]) for op in OPERATIONS
    ]
    return routes
