"""CodeMachine import: parsing, the mapping to a ProtocolSpec, a run with the scripted engine, bad
workspaces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from bot.cli.main import main
from bot.codemachine.importer import import_workspace, read_workspace_dir
from bot.codemachine.mapping import build_import
from bot.codemachine.parser import CodeMachineError, load_workspace, parse_js, select_workflow
from bot.domain.spec import validate_spec
from bot.domain.states import ProtocolStatus, StepStatus
from bot.storage.models import Event, ProtocolRun, StepRun
from bot.web.app import create_app
from engines.scripted import ScriptedEngine
from tests.codemachine.workspace import WORKFLOW, workspace_files, write_workspace
from tests.conftest import LiveServer
from tests.gitutil import git
from tests.protocol.conftest import (
    Harness,
    make_harness,
    origin_branches,
    origin_file,
    origin_files,
    protocol_settings,
    scripted_script,
)

API_TOKEN = "api-test-token-0123456789"


def test_js_subset_parser() -> None:
    value = parse_js(
        "const path = require('path');\n/* block */ const d = path.join(__dirname, '..', 'p');\n"
        'module.exports = [{ id: \'a\', list: [1, 2.5, true, null,], s: "q\\"x", '
        "p: path.join(d, 'x.md'), d },];",
        "config/x.js",
    )
    assert value == [{"id": "a", "list": [1, 2.5, True, None], "s": 'q"x', "p": "p/x.md", "d": "p"}]
    wf = parse_js(WORKFLOW, "templates/workflows/w.workflow.js")
    assert [c.function for c in wf["steps"]] == [
        "resolveStep",
        "resolveUI",
        "resolveStep",
        "resolveStep",
        "resolveModule",
        "separator",
        "resolveModule",
    ]
    with pytest.raises(
        CodeMachineError, match=r"config/x\.js: line 2, column 3: unknown name 'nope'"
    ):
        parse_js("module.exports = [\n  nope ]", "config/x.js")


def test_workspace_maps_to_a_valid_spec() -> None:
    ws = load_workspace(workspace_files())
    workflow = select_workflow(ws, None)  # .codemachine/template.json picks it
    assert workflow == "templates/workflows/greeting.workflow.js"
    plan = build_import(
        ws, workflow, "0001-add-a-greeting", engine="scripted", known_engines={"scripted", "codex"}
    )
    spec = validate_spec(plan.spec)
    assert (
        spec.source == "codemachine" and spec.task == "Add a greeting" and spec.engine == "scripted"
    )
    assert [(s.index, s.slug) for s in spec.steps] == [
        (1, "init"),
        (2, "code-generation"),
        (3, "task-sanity-check"),
        (4, "check-task"),
        (5, "docs-gate"),
        (6, "write-docs"),  # the trigger's target, appended
    ]
    code, review, check, gate = spec.step(2), spec.step(3), spec.step(4), spec.step(5)
    assert (code.engine, code.model) == ("codex", "gpt-5-codex")
    # claude is not an engine here: the step runs on the protocol engine, without claude's model
    assert (review.engine, review.model, review.title) == (None, None, "Reviewer")
    assert any("'claude' is not available" in w for w in plan.warnings)
    assert check.loop is not None
    assert (check.loop.back_to, check.loop.max_iterations, check.loop.on) == (2, 3, "qa_fail")
    assert check.qa.policy == "full" and check.step_type == "review"
    assert [(t.on, t.step, t.mode) for t in gate.triggers] == [("pass", 6, "enqueue")]
    assert code.outputs.protocol == ".protocols/0001-add-a-greeting/02-code-generation.md"
    assert code.outputs.extra == (
        ".codemachine/artifacts/plan",
        ".codemachine/artifacts/tasks.json",
    )
    step_file = plan.files[".protocols/0001-add-a-greeting/02-code-generation.md"]
    # placeholders: user paths as references, package files inlined, other braces untouched
    assert "`.codemachine/artifacts/tasks.json`" in step_file
    assert "Never delete files you did not create." in step_file
    assert "{not_a_placeholder}" in step_file
    assert step_file.index("Now add tests.") < step_file.index(
        "Now polish."
    )  # chained prompts, in order
    context = plan.files[".protocols/0001-add-a-greeting/context.md"]
    assert "founder-architect" in context
    assert plan.files[".codemachine/inputs/specifications.md"].startswith("# Add a greeting")
    assert json.loads(plan.files[".protocols/0001-add-a-greeting/spec.json"]) == plan.spec


def broken(**changes: str | None) -> dict[str, str]:
    files = workspace_files()
    for rel, text in changes.items():
        path = rel.replace("__", "/").replace("_js", ".js").replace("_md", ".md")
        if text is None:
            files.pop(path, None)
        else:
            files[path] = text
    return files


MALFORMED = [
    pytest.param(
        {
            "config/main.agents.js": workspace_files()["config/main.agents.js"].replace(
                "'01-code.md'", "'missing.md'"
            )
        },
        r"config/main\.agents\.js: \[1\]\.promptPath\[1\]: "
        r"prompt file 'prompts/templates/main-agents/missing\.md' does not exist",
        id="missing-prompt-file",
    ),
    pytest.param(
        {
            "templates/workflows/greeting.workflow.js": WORKFLOW.replace(
                "resolveStep('task-sanity-check'", "resolveStep('ghost'"
            )
        },
        r"templates/workflows/greeting\.workflow\.js: steps\[3\]: "
        r"unknown agent 'ghost' \(not in config/main\.agents\.js\)",
        id="unknown-agent",
    ),
    pytest.param(
        {
            "config/modules.js": workspace_files()["config/modules.js"].replace(
                "type: 'loop'", "type: 'repeat'"
            )
        },
        r"config/modules\.js: \[0\]\.behavior\.type: must be 'loop' or 'trigger', not 'repeat'",
        id="bad-module-type",
    ),
    pytest.param(
        {
            "config/sub.agents.js": (
                "module.exports = [\n  { id: 'x', name: 'X' \n  { id: 'y' },\n];\n"
            )
        },
        r"config/sub\.agents\.js: line 3, column 3: expected '}', found '\{'",
        id="syntax-error",
    ),
    pytest.param(
        {
            "templates/workflows/greeting.workflow.js": WORKFLOW.replace(
                "loopMaxIterations: 3", "loopMaxIterations: 0"
            )
        },
        r"greeting\.workflow\.js: steps\[4\]\.loopMaxIterations: must be a positive integer",
        id="bad-loop-bound",
    ),
    pytest.param(
        {"config/main.agents.js": None},
        r"config/main\.agents\.js: is missing from the workspace",
        id="no-main-agents",
    ),
]


@pytest.mark.parametrize(("changes", "message"), MALFORMED)
def test_malformed_workspaces_name_file_and_field(
    changes: dict[str, str | None], message: str
) -> None:
    files = workspace_files()
    for rel, text in changes.items():
        if text is None:
            files.pop(rel)
        else:
            files[rel] = text
    with pytest.raises(CodeMachineError, match=message) as err:
        ws = load_workspace(files)
        build_import(
            ws, select_workflow(ws, None), "0001-x", engine="scripted", known_engines={"scripted"}
        )
    assert err.value.errors == [str(err.value)]


# -- imported and run ---------------------------------------------------------------------


@pytest.fixture
async def cm_harness(tmp_path: Path, origin: Path) -> AsyncIterator[Harness]:
    settings = protocol_settings(tmp_path)
    script = scripted_script(
        qa={
            "default": {"verdicts": ["PASS"]},
            "steps": {"check-task": {"verdicts": ["FAIL", "PASS"]}},
        }
    )
    path = tmp_path / "script.yml"
    path.write_text(yaml.safe_dump(script))
    async with make_harness(settings, origin) as h:
        h.use(ScriptedEngine(path))
        yield h


async def test_imported_workspace_runs_with_the_scripted_engine(cm_harness: Harness) -> None:
    h = cm_harness
    run, _plan = await import_workspace(h.ctx, h.project, workspace_files(), auto_mode=True)
    assert run.protocol_name == "0001-add-a-greeting"
    await h.drain()
    state = await h.state(run.id)
    assert state.run.template_source == "codemachine"
    assert state.run.status == ProtocolStatus.COMPLETED, (
        state.run.runtime_state,
        [s.status for s in state.steps],
    )
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED] * 6
    # the loop gate failed QA once: steps 2..4 ran again (init is outside the loop), then the
    # docs gate passed and triggered the appended docs step
    assert [s.retries for s in state.steps] == [0, 1, 1, 1, 0, 0]
    messages = [e.message for e in await h.events(run.id)]
    assert "loop: qa_fail on step 04: loop 1/3, back to step 02" in messages
    assert any(m.startswith("step 05 pass → step 06") for m in messages)
    name = run.protocol_name
    files = set(origin_files(h.origin, name, f".protocols/{name}"))
    for rel in ("plan.md", "context.md", "log.md", "00-setup.md", "spec.json", "04-check-task.md"):
        assert f".protocols/{name}/{rel}" in files
    spec = json.loads(origin_file(h.origin, name, f".protocols/{name}/spec.json"))
    assert spec["source"] == "codemachine"
    assert origin_file(h.origin, name, ".codemachine/inputs/specifications.md").startswith(
        "# Add a greeting"
    )
    types = await h.event_types(run.id)
    assert types[0] == "protocol.imported"


async def test_a_malformed_import_creates_nothing(cm_harness: Harness) -> None:
    h = cm_harness
    files = workspace_files()
    files["config/modules.js"] = files["config/modules.js"].replace(
        "triggerAgentId: 'write-docs'", "triggerAgentId: 'nobody'"
    )
    with pytest.raises(
        CodeMachineError,
        match=r"config/modules\.js: \[1\]\.behavior\.triggerAgentId: unknown main agent 'nobody'",
    ):
        await import_workspace(h.ctx, h.project, files)
    async with h.ctx["db"].sessions() as session:
        assert (await session.execute(select(func.count()).select_from(ProtocolRun))).scalar() == 0
        assert (await session.execute(select(func.count()).select_from(StepRun))).scalar() == 0
        events = (await session.execute(select(Event.event_type))).scalars().all()
        assert events == ["project.created"]  # the harness's project, nothing from the import
    assert origin_branches(h.origin) == ["main"]


async def test_codemachine_import_api(cm_harness: Harness) -> None:
    h = cm_harness
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    with LiveServer(create_app(h.ctx["settings"], embedded_worker=False)) as server:
        async with httpx.AsyncClient(timeout=30, headers=headers) as client:
            url = f"{server.url}/api/projects/{h.project.id}/codemachine/import"
            bad = broken(
                config__modules_js=workspace_files()["config/modules.js"].replace(
                    "type: 'loop'", "type: 5"
                )
            )
            r = await client.post(url, json={"files": bad})
            assert r.status_code == 422, r.text
            assert "config/modules.js: [0].behavior.type" in r.json()["error"]
            r = await client.post(url, json={"files": "nope"})
            assert r.status_code == 422
            r = await client.post(
                f"{server.url}/api/projects/999/codemachine/import",
                json={"files": workspace_files()},
            )
            assert r.status_code == 404
            r = await client.post(url, json={"files": workspace_files(), "workflow": "Only Init"})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["workflow"] == "templates/workflows/only-init.workflow.js"
            assert body["steps"] == ["01-init.md"]
            r = await client.post(
                url, json={"files": workspace_files()}, headers={"Authorization": "Bearer wrong"}
            )
            assert r.status_code == 401
    state = await h.state(body["protocol_run_id"])
    assert state.run.template_source == "codemachine" and [s.step_index for s in state.steps] == [1]


async def test_codemachine_import_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "README.md").write_text("# r\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "init", cwd=repo)
    ws = write_workspace(tmp_path / "ws")
    assert sorted(read_workspace_dir(ws)) == sorted(workspace_files())
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", f"sqlite:///{tmp_path / 'db.sqlite3'}")
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEKSDENFLOW_ENGINE", "scripted")
    code = await asyncio.to_thread(main, ["codemachine", "import", str(ws), "--repo", str(repo)])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert (
        result["protocol"] == "0001-add-a-greeting" and result["status"] == ProtocolStatus.PLANNED
    )
    assert len(result["steps"]) == 6
    assert "0001-add-a-greeting" in git("branch", "--list", cwd=repo)
    (ws / "config/modules.js").write_text("module.exports = {};\n")
    code = await asyncio.to_thread(main, ["codemachine", "import", str(ws), "--repo", str(repo)])
    assert code == 1
    assert (
        "config/modules.js: module.exports: must be an array of entries" in capsys.readouterr().err
    )
