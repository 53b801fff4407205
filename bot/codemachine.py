"""CodeMachine workspaces → ProtocolSpec: a parser for their JS config files, the mapping, the import.

A CodeMachine workspace (the CodeMachine-CLI layout) holds `config/main.agents.js`,
`config/sub.agents.js`, `config/modules.js`, optionally `config/placeholders.js`, workflow
templates `templates/workflows/*.workflow.js` built from `resolveStep`/`resolveModule`/
`resolveUI` (or `separator`) calls, the prompt files those name, and optionally
`.codemachine/template.json` (the selected template) and `.codemachine/inputs/specifications.md`.
The config files are JavaScript; only the literal subset they use is understood (objects, arrays,
strings, numbers, `require`, `path.join`, `__dirname`, constants) — nothing is executed.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import SpecError
from bot.git.names import slugify
from bot.spec import protocol_dir, step_file_name, validate_spec

MAIN_AGENTS = "config/main.agents.js"
SUB_AGENTS = "config/sub.agents.js"
MODULES = "config/modules.js"
PLACEHOLDERS = "config/placeholders.js"
WORKFLOWS_DIR = "templates/workflows"
TEMPLATE_JSON = ".codemachine/template.json"
SPECIFICATIONS = ".codemachine/inputs/specifications.md"
MAX_FILE_BYTES = 512 * 1024
MAX_FILES = 2000
DEFAULT_LOOP_ITERATIONS = 5
SKIP_DIRS = {".git", "node_modules", "dist", "build", "__pycache__"}


class CodeMachineError(SpecError):
    """A malformed workspace: the message names the file and the field."""

    def __init__(self, file: str, where: str, message: str) -> None:
        text = f"{file}: {where}: {message}" if where else f"{file}: {message}"
        super().__init__(text, errors=[text])
        self.file = file
        self.where = where


# -- a parser for the JavaScript literal subset the config files use -------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<str>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|`(?:[^`\\$]|\\.|\$(?!\{))*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<name>[A-Za-z_$][\w$]*)
  | (?P<punct>\.\.\.|[{}\[\]():,.;=])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "`": "`", "0": "\0"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: str
    line: int
    col: int


@dataclass(frozen=True)
class _Module:
    """The value of `require('x')`: only `path`'s join/resolve are understood."""

    name: str


@dataclass(frozen=True)
class Call:
    """A workflow step entry: resolveStep / resolveModule / resolveUI / separator."""

    function: str
    args: tuple[Any, ...]
    line: int


def _unescape(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body, flags=re.DOTALL)


def _tokenize(text: str, file: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise CodeMachineError(file, f"line {line}", f"unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        value = m.group()
        if kind != "ws":
            tokens.append(_Tok(kind, value, line, pos - line_start + 1))
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = pos + value.rfind("\n") + 1
        pos = m.end()
    return tokens


WORKFLOW_FUNCTIONS = {"resolveStep", "resolveModule", "resolveUI", "separator", "resolveFolder"}


class _Parser:
    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.toks = _tokenize(text, file)
        self.i = 0
        self.vars: dict[str, Any] = {"__dirname": posixpath.dirname(file)}

    def _peek(self, offset: int = 0) -> _Tok | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def _fail(self, message: str, tok: _Tok | None = None) -> CodeMachineError:
        tok = tok or self._peek()
        where = f"line {tok.line}, column {tok.col}" if tok else "end of file"
        return CodeMachineError(self.file, where, message)

    def _next(self) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise self._fail("unexpected end of file")
        self.i += 1
        return tok

    def _expect(self, value: str) -> None:
        tok = self._next()
        if tok.value != value:
            raise self._fail(f"expected {value!r}, found {tok.value!r}", tok)

    def _accept(self, value: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.value == value and tok.kind in ("punct", "name"):
            self.i += 1
            return True
        return False

    def module(self) -> Any:
        """The exported value (`module.exports = …` or `export default …`)."""
        exported: Any = None
        found = False
        while self._peek() is not None:
            tok = self._next()
            if tok.value in ("const", "let", "var"):
                name = self._next()
                if name.kind != "name":
                    raise self._fail("destructuring is not supported", name)
                self._expect("=")
                self.vars[name.value] = self.expr()
            elif tok.value == "module" and self._accept("."):
                prop = self._next()
                if prop.value != "exports":
                    raise self._fail(f"unexpected module.{prop.value}", prop)
                self._expect("=")
                exported, found = self.expr(), True
            elif tok.value == "export":
                if not self._accept("default"):
                    raise self._fail("only `export default` is supported")
                exported, found = self.expr(), True
            elif tok.value == "import":
                # `import x from '…'`: nothing to evaluate; skip to the module string
                while self._next().kind != "str":
                    pass
            elif tok.value == ";":
                continue
            elif tok.value == "require":
                self._expect("(")
                self.expr()
                self._expect(")")
            else:
                raise self._fail(f"unexpected {tok.value!r}", tok)
        if not found:
            raise CodeMachineError(self.file, "", "no `module.exports = …` or `export default …`")
        return exported

    def expr(self) -> Any:
        tok = self._next()
        if tok.kind == "str":
            return _unescape(tok.value)
        if tok.kind == "num":
            return float(tok.value) if "." in tok.value else int(tok.value)
        if tok.value == "{":
            return self._object()
        if tok.value == "[":
            return self._array()
        if tok.value == "(":
            value = self.expr()
            self._expect(")")
            return value
        if tok.kind == "name":
            return self._name(tok)
        raise self._fail(f"unexpected {tok.value!r}", tok)

    def _object(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while not self._accept("}"):
            key = self._next()
            if key.kind == "str":
                name = _unescape(key.value)
            elif key.kind in ("name", "num"):
                name = key.value
            else:
                raise self._fail(f"expected a property name, found {key.value!r}", key)
            if self._peek() is not None and self._peek().value in (",", "}"):  # type: ignore[union-attr]
                out[name] = self._lookup(key)  # shorthand `{ name }`
            else:
                self._expect(":")
                out[name] = self.expr()
            if not self._accept(","):
                self._expect("}")
                break
        return out

    def _array(self) -> list[Any]:
        out: list[Any] = []
        while not self._accept("]"):
            out.append(self.expr())
            if not self._accept(","):
                self._expect("]")
                break
        return out

    def _lookup(self, tok: _Tok) -> Any:
        if tok.value not in self.vars:
            raise self._fail(f"unknown name {tok.value!r}", tok)
        return self.vars[tok.value]

    def _args(self) -> list[Any]:
        args: list[Any] = []
        while not self._accept(")"):
            args.append(self.expr())
            if not self._accept(","):
                self._expect(")")
                break
        return args

    def _name(self, tok: _Tok) -> Any:
        constants = {"true": True, "false": False, "null": None, "undefined": None}
        if tok.value in constants:
            return constants[tok.value]
        if tok.value == "require":
            self._expect("(")
            target = self.expr()
            self._expect(")")
            return _Module(str(target).removeprefix("node:"))
        if tok.value in WORKFLOW_FUNCTIONS:
            self._expect("(")
            return Call(tok.value, tuple(self._args()), tok.line)
        value = self._lookup(tok)
        if isinstance(value, _Module) and self._accept("."):
            method = self._next()
            self._expect("(")
            args = self._args()
            if value.name == "path" and method.value in ("join", "resolve"):
                if not all(isinstance(a, str) for a in args):
                    raise self._fail("path.join takes strings", method)
                return posixpath.normpath(posixpath.join(*args)) if args else "."
            raise self._fail(f"unsupported call {value.name}.{method.value}()", method)
        return value


def parse_js(text: str, file: str) -> Any:
    """The value a CodeMachine config/workflow file exports; CodeMachineError if it can't be read."""
    return _Parser(text, file).module()


# -- the workspace --------------------------------------------------------------------------


@dataclass
class Workspace:
    """A workspace's files (relative posix path → text) and what its config files declare."""

    files: dict[str, str]
    main_agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    sub_agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    placeholders: dict[str, dict[str, str]] = field(default_factory=dict)
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)  # file → template


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


def _clean_rel(path: str) -> str:
    return posixpath.normpath(path.replace("\\", "/")).lstrip("/")


def _str_list(value: Any, file: str, where: str, *, required: bool) -> list[str]:
    if value is None:
        if required:
            raise CodeMachineError(file, where, "is required")
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise CodeMachineError(file, where, "must be a path or a list of paths")
    return [_clean_rel(v) for v in items]


def _entries(files: Mapping[str, str], file: str, *, required: bool) -> dict[str, dict[str, Any]]:
    if file not in files:
        if required:
            raise CodeMachineError(file, "", "is missing from the workspace")
        return {}
    value = parse_js(files[file], file)
    if not isinstance(value, list):
        raise CodeMachineError(file, "module.exports", "must be an array of entries")
    out: dict[str, dict[str, Any]] = {}
    for pos, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise CodeMachineError(file, f"[{pos}]", "must be an object")
        ident = entry.get("id")
        if not isinstance(ident, str) or not ident.strip():
            raise CodeMachineError(file, f"[{pos}].id", "is required (a non-empty string)")
        if ident in out:
            raise CodeMachineError(file, f"[{pos}].id", f"duplicate id {ident!r}")
        out[ident] = {**entry, "_pos": pos}
    return out


def _check_prompt_files(
    files: Mapping[str, str], file: str, where: str, paths: list[str]
) -> None:
    for k, path in enumerate(paths):
        if path.startswith("..") or path not in files:
            at = f"{where}[{k}]" if len(paths) > 1 else where
            raise CodeMachineError(file, at, f"prompt file {path!r} does not exist in the workspace")


def load_workspace(files: Mapping[str, str]) -> Workspace:
    """Parse and check a workspace's config and workflow files."""
    files = {_clean_rel(k): v for k, v in files.items()}
    ws = Workspace(files=dict(files))
    ws.main_agents = _entries(files, MAIN_AGENTS, required=True)
    ws.sub_agents = _entries(files, SUB_AGENTS, required=False)
    ws.modules = _entries(files, MODULES, required=False)
    for agent in ws.main_agents.values():
        at = f"[{agent['_pos']}]"
        prompts = _str_list(agent.get("promptPath"), MAIN_AGENTS, f"{at}.promptPath", required=True)
        _check_prompt_files(files, MAIN_AGENTS, f"{at}.promptPath", prompts)
        chained = _str_list(agent.get("chainedPromptsPath"), MAIN_AGENTS, f"{at}.chainedPromptsPath", required=False)
        # a chained path may name a folder of prompts (every .md in it, in order)
        expanded: list[str] = []
        for path in chained:
            inside = sorted(f for f in files if f.startswith(path + "/") and f.endswith(".md"))
            expanded += inside or [path]
        _check_prompt_files(files, MAIN_AGENTS, f"{at}.chainedPromptsPath", expanded)
        agent["_prompts"] = prompts + expanded
        for key in ("engine", "model", "name", "description"):
            if agent.get(key) is not None and not isinstance(agent[key], str):
                raise CodeMachineError(MAIN_AGENTS, f"{at}.{key}", "must be a string")
    for sub in ws.sub_agents.values():
        at = f"[{sub['_pos']}]"
        paths = _str_list(sub.get("mirrorPath") or sub.get("promptPath"), SUB_AGENTS, f"{at}.mirrorPath", required=False)
        _check_prompt_files(files, SUB_AGENTS, f"{at}.mirrorPath", paths)
        sub["_prompts"] = paths
    for module in ws.modules.values():
        at = f"[{module['_pos']}]"
        prompts = _str_list(module.get("promptPath"), MODULES, f"{at}.promptPath", required=True)
        _check_prompt_files(files, MODULES, f"{at}.promptPath", prompts)
        module["_prompts"] = prompts
        behavior = module.get("behavior")
        if not isinstance(behavior, dict):
            raise CodeMachineError(MODULES, f"{at}.behavior", "is required (an object with a type)")
        kind = behavior.get("type")
        if kind not in ("loop", "trigger"):
            raise CodeMachineError(MODULES, f"{at}.behavior.type", f"must be 'loop' or 'trigger', not {kind!r}")
        if kind == "trigger" and behavior.get("triggerAgentId") is not None:
            target = behavior["triggerAgentId"]
            if target not in ws.main_agents:
                raise CodeMachineError(
                    MODULES, f"{at}.behavior.triggerAgentId", f"unknown main agent {target!r}"
                )
    if PLACEHOLDERS in files:
        value = parse_js(files[PLACEHOLDERS], PLACEHOLDERS)
        if not isinstance(value, dict):
            raise CodeMachineError(PLACEHOLDERS, "module.exports", "must be an object")
        for group in ("userDir", "packageDir"):
            entries = value.get(group, {})
            if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
                raise CodeMachineError(PLACEHOLDERS, group, "must map names to paths")
            ws.placeholders[group] = {k: _clean_rel(v) for k, v in entries.items()}
    for path in sorted(files):
        if path.startswith(WORKFLOWS_DIR + "/") and path.endswith(".js"):
            ws.workflows[path] = _workflow(ws, path)
    if not ws.workflows:
        raise CodeMachineError(WORKFLOWS_DIR, "", "no workflow template (*.workflow.js)")
    return ws


def _workflow(ws: Workspace, file: str) -> dict[str, Any]:
    value = parse_js(ws.files[file], file)
    if not isinstance(value, dict):
        raise CodeMachineError(file, "export default", "must be an object with name and steps")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CodeMachineError(file, "name", "is required (a non-empty string)")
    steps = value.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CodeMachineError(file, "steps", "must be a non-empty array")
    for pos, call in enumerate(steps):
        at = f"steps[{pos}]"
        if not isinstance(call, Call):
            raise CodeMachineError(file, at, "must be a resolveStep(), resolveModule() or resolveUI() call")
        if call.function in ("resolveUI", "separator"):
            continue
        if call.function == "resolveFolder":
            raise CodeMachineError(file, at, "resolveFolder() is not supported; list the steps")
        if not call.args or not isinstance(call.args[0], str):
            raise CodeMachineError(file, f"{at}", f"{call.function}() needs an agent id")
        ident = call.args[0]
        opts = call.args[1] if len(call.args) > 1 else {}
        if not isinstance(opts, dict):
            raise CodeMachineError(file, f"{at}.options", "must be an object")
        table, config = (
            (ws.main_agents, MAIN_AGENTS) if call.function == "resolveStep" else (ws.modules, MODULES)
        )
        if ident not in table:
            raise CodeMachineError(file, f"{at}", f"unknown {'agent' if table is ws.main_agents else 'module'} {ident!r} (not in {config})")
        for key in ("loopSteps", "loopMaxIterations"):
            if key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1):
                raise CodeMachineError(file, f"{at}.{key}", "must be a positive integer")
        for key in ("engine", "model", "agentName", "notCompletedFallback", "modelReasoningEffort"):
            if opts.get(key) is not None and not isinstance(opts[key], str):
                raise CodeMachineError(file, f"{at}.{key}", "must be a string")
        skip = opts.get("loopSkip", [])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise CodeMachineError(file, f"{at}.loopSkip", "must be a list of agent ids")
    sub_ids = value.get("subAgentIds", [])
    if not isinstance(sub_ids, list) or not all(isinstance(s, str) for s in sub_ids):
        raise CodeMachineError(file, "subAgentIds", "must be a list of sub-agent ids")
    for k, sub in enumerate(sub_ids):
        if sub not in ws.sub_agents:
            raise CodeMachineError(file, f"subAgentIds[{k}]", f"unknown sub-agent {sub!r} (not in {SUB_AGENTS})")
    return value


def select_workflow(ws: Workspace, wanted: str | None) -> str:
    """The workflow file: `wanted` (name, file name or path), the template.json choice, or the only one."""
    if wanted is None and TEMPLATE_JSON in ws.files:
        try:
            data = json.loads(ws.files[TEMPLATE_JSON])
        except json.JSONDecodeError as exc:
            raise CodeMachineError(TEMPLATE_JSON, "", f"is not JSON: {exc}") from None
        chosen = data.get("activeTemplate") or data.get("template") if isinstance(data, dict) else None
        if not isinstance(chosen, str):
            raise CodeMachineError(TEMPLATE_JSON, "activeTemplate", "must name the selected workflow template")
        wanted = chosen
    if wanted is None:
        if len(ws.workflows) > 1:
            raise CodeMachineError(
                WORKFLOWS_DIR, "", f"several workflows ({', '.join(sorted(ws.workflows))}): choose one"
            )
        return next(iter(ws.workflows))
    base = posixpath.basename(wanted)
    for path, template in ws.workflows.items():
        stem = posixpath.basename(path).removesuffix(".js").removesuffix(".workflow")
        if wanted in (path, posixpath.basename(path), stem, template.get("name")) or base == posixpath.basename(path):
            return path
    raise CodeMachineError(WORKFLOWS_DIR, "", f"no workflow {wanted!r}")


# -- mapping to a ProtocolSpec ----------------------------------------------------------------


@dataclass
class ImportPlan:
    """What an import creates: the spec data, the protocol files, warnings for the operator."""

    spec: dict[str, Any]
    files: dict[str, str]  # repository path → content
    workflow: str
    warnings: list[str]


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _fill_placeholders(ws: Workspace, text: str, outputs: list[str]) -> str:
    user = ws.placeholders.get("userDir", {})
    package = ws.placeholders.get("packageDir", {})

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in user:
            path = user[name]
            if path.startswith(".codemachine/artifacts/") or path.startswith(".codemachine/prompts/"):
                outputs.append(_glob_root(path))
            return f"`{path}`"
        if name in package:
            return ws.files.get(package[name], f"`{package[name]}`")
        return m.group(0)  # braces in code or JSON stay as they are

    return _PLACEHOLDER.sub(sub, text)


def _glob_root(path: str) -> str:
    parts = path.split("/")
    for k, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:k]) or "."
    return path


def build_import(
    ws: Workspace,
    workflow_file: str,
    protocol: str,
    *,
    engine: str,
    known_engines: set[str],
    qa_policy: str = "light",
) -> ImportPlan:
    """The ProtocolSpec (validated) and the files for one workflow of the workspace (pure)."""
    template = ws.workflows[workflow_file]
    warnings: list[str] = []
    calls = [c for c in template["steps"] if c.function in ("resolveStep", "resolveModule")]
    # index of each main agent's first appearance, for loop ranges and trigger targets
    first_index: dict[str, int] = {}
    for i, call in enumerate(calls, start=1):
        if call.function == "resolveStep":
            first_index.setdefault(call.args[0], i)
    extra_agents: list[str] = []
    for call in calls:
        if call.function == "resolveModule":
            behavior = ws.modules[call.args[0]]["behavior"]
            opts = call.args[1] if len(call.args) > 1 else {}
            target = opts.get("triggerAgentId") or behavior.get("triggerAgentId")
            if behavior["type"] == "trigger" and target and target not in first_index and target not in extra_agents:
                if target not in ws.main_agents:
                    raise CodeMachineError(workflow_file, "triggerAgentId", f"unknown main agent {target!r}")
                extra_agents.append(target)
    entries: list[tuple[str, str, dict[str, Any]]] = [
        (c.function, c.args[0], dict(c.args[1]) if len(c.args) > 1 else {}) for c in calls
    ]
    for agent_id in extra_agents:
        first_index[agent_id] = len(entries) + 1
        entries.append(("resolveStep", agent_id, {}))
        warnings.append(
            f"trigger target {agent_id!r} is not a workflow step: added as step {first_index[agent_id]}"
        )
    base = protocol_dir(protocol)
    steps: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    used_slugs: set[str] = set()
    for i, (function, ident, opts) in enumerate(entries, start=1):
        is_module = function == "resolveModule"
        source = ws.modules[ident] if is_module else ws.main_agents[ident]
        slug = slugify(ident, 40)
        while slug in used_slugs:
            slug = f"{slug[:40]}-{i}"
        used_slugs.add(slug)
        file = step_file_name(i, slug)
        title = str(opts.get("agentName") or source.get("name") or ident)[:200]
        outputs: list[str] = []
        prompt_text = "\n\n".join(
            _fill_placeholders(ws, ws.files[p], outputs).strip() for p in source["_prompts"]
        )
        step: dict[str, Any] = {
            "index": i,
            "slug": slug,
            "title": title,
            "file": file,
            "step_type": "work",
            "commit_type": "feat",
            "qa": {"policy": qa_policy},
            "outputs": {"protocol": f"{base}/{file}"},
        }
        depends = _depends_on(opts.get("dependsOn", source.get("dependsOn")), first_index, workflow_file, i)
        if depends is not None:
            step["depends_on"] = depends
        step_engine = opts.get("engine") or source.get("engine")
        step_model = opts.get("model") or source.get("model")
        if step_engine and step_engine not in known_engines:
            warnings.append(
                f"step {i:02d} ({ident}): engine {step_engine!r} is not available here; "
                f"it runs on {engine}" + (f" without model {step_model!r}" if step_model else "")
            )
            step_engine, step_model = None, None
        if step_engine:
            step["engine"] = step_engine
        if step_model:
            step["model"] = step_model
            step["qa"]["model"] = step_model
        notes: list[str] = []
        if opts.get("notCompletedFallback"):
            notes.append(
                f"If this step cannot be completed, CodeMachine would hand over to "
                f"`{opts['notCompletedFallback']}`; here the step fails and the protocol blocks for a human."
            )
        if is_module:
            behavior = source["behavior"]
            step["step_type"] = "review"
            step["commit_type"] = "chore"
            if behavior["type"] == "loop":
                back = opts.get("loopSteps", behavior.get("steps", 1))
                iterations = opts.get("loopMaxIterations", behavior.get("maxIterations"))
                if iterations is None:
                    iterations = DEFAULT_LOOP_ITERATIONS
                    warnings.append(
                        f"step {i:02d} ({ident}): no loopMaxIterations; bounded at {iterations}"
                    )
                if not isinstance(back, int) or isinstance(back, bool) or back < 1:
                    raise CodeMachineError(MODULES, f"[{source['_pos']}].behavior.steps", "must be a positive integer")
                iterations = min(int(iterations), 50)
                back_to = max(1, i - back)
                skip_ids = set(opts.get("loopSkip", behavior.get("skip", [])) or [])
                skip = sorted(
                    k
                    for k, (fn, other, other_opts) in enumerate(entries[back_to - 1 : i - 1], start=back_to)
                    if other in skip_ids or other_opts.get("executeOnce")
                )
                step["qa"] = {"policy": "full", **({"model": step_model} if step_model else {})}
                step["loop"] = {"max_iterations": iterations, "back_to": back_to, "skip_steps": skip, "on": "qa_fail"}
                notes.append(
                    f"This is a loop gate: end the QA with VERDICT: FAIL to go back to step "
                    f"{back_to:02d} (at most {iterations} times), VERDICT: PASS to go on."
                )
            else:
                target = opts.get("triggerAgentId") or behavior.get("triggerAgentId")
                if target:
                    step["triggers"] = [{"on": "pass", "step": first_index[target], "mode": "enqueue"}]
                    notes.append(f"When this step passes, step {first_index[target]:02d} ({target}) runs.")
                else:
                    warnings.append(f"step {i:02d} ({ident}): trigger module without triggerAgentId")
        outputs = sorted(set(outputs))
        if outputs:
            step["outputs"]["extra"] = outputs
        steps.append(step)
        files[f"{base}/{file}"] = _step_file(title, ident, source, prompt_text, notes, outputs)
    task = _task(ws, template)
    spec_data: dict[str, Any] = {
        "version": 1,
        "protocol": protocol,
        "task": task,
        "engine": engine,
        "qa_policy": qa_policy,
        "source": "codemachine",
        "steps": steps,
    }
    spec = validate_spec(spec_data)  # schema + cross-field rules; SpecError names the JSON path
    from bot.spec import spec_to_dict

    spec_dict = spec_to_dict(spec)
    files.update(_protocol_files(ws, template, workflow_file, protocol, spec_dict, warnings))
    if SPECIFICATIONS in ws.files:
        files[SPECIFICATIONS] = ws.files[SPECIFICATIONS]
    return ImportPlan(spec=spec_dict, files=files, workflow=workflow_file, warnings=warnings)


def _depends_on(value: Any, first_index: Mapping[str, int], file: str, i: int) -> list[int] | None:
    """A step's `dependsOn` (agent ids, or step numbers) as step indexes; None when not given
    (the step then follows the previous one, as CodeMachine runs them)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for k, item in enumerate(items):
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and item in first_index:
            out.append(first_index[item])
        else:
            raise CodeMachineError(file, f"steps[{i - 1}].dependsOn[{k}]", f"unknown step {item!r}")
    return out


def _task(ws: Workspace, template: Mapping[str, Any]) -> str:
    spec_text = ws.files.get(SPECIFICATIONS, "")
    for line in spec_text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:2000]
    return f"CodeMachine workflow: {template['name']}"[:2000]


def _step_file(
    title: str, ident: str, source: Mapping[str, Any], prompt: str, notes: list[str], outputs: list[str]
) -> str:
    parts = [f"# {title}", "", f"Imported from CodeMachine `{ident}`."]
    if source.get("description"):
        parts += ["", str(source["description"])]
    if outputs:
        parts += ["", "## Outputs", "", *[f"- `{o}`" for o in outputs]]
    if notes:
        parts += ["", "## How this step runs here", "", *[f"- {n}" for n in notes]]
    parts += ["", "## Instructions", "", prompt, "", "## Notes", ""]
    return "\n".join(parts) + "\n"


def _protocol_files(
    ws: Workspace,
    template: Mapping[str, Any],
    workflow_file: str,
    protocol: str,
    spec: Mapping[str, Any],
    warnings: list[str],
) -> dict[str, str]:
    base = protocol_dir(protocol)
    step_lines = [f"{s['index']:02d}. {s['title']} (`{s['file']}`)" for s in spec["steps"]]
    plan = "\n".join(
        [f"# Plan for {protocol}", "", f"Imported from the CodeMachine workflow **{template['name']}** "
         f"(`{workflow_file}`).", "", "## Goal", "", spec["task"], "", "## Steps", "", *step_lines, ""]
    )
    subs = []
    for sub_id in template.get("subAgentIds", []):
        sub = ws.sub_agents[sub_id]
        line = f"- `{sub_id}`: {sub.get('name') or sub_id}"
        if sub.get("description"):
            line += f" — {sub['description']}"
        subs.append(line)
        for path in sub.get("_prompts", []):
            subs.append(f"  (prompt: `{path}`)")
    context_parts = ["# Context", ""]
    if SPECIFICATIONS in ws.files:
        context_parts += [f"The specification is in `{SPECIFICATIONS}`.", ""]
    if subs:
        context_parts += ["## Sub-agents available to the steps", "", *subs, ""]
    log = "# Log\n\n- Imported from CodeMachine workflow " + f"{template['name']!r}.\n" + "".join(
        f"- Warning: {w}\n" for w in warnings
    )
    setup = "# Setup\n\nNothing to install for the import itself; steps set up what they need.\n"
    return {
        f"{base}/plan.md": plan,
        f"{base}/context.md": "\n".join(context_parts),
        f"{base}/log.md": log,
        f"{base}/00-setup.md": setup,
        f"{base}/spec.json": json.dumps(spec, indent=2) + "\n",
    }


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
    from bot.models import ProtocolRun, StepRun
    from bot.spec import step_to_dict
    from bot.store import new_event

    spec = validate_spec(plan.spec)
    async with db.sessions.begin() as session:
        run = ProtocolRun(
            project_id=project.id,
            protocol_name=spec.protocol,
            status="pending",
            base_branch=base_branch,
            description=spec.task,
            auto_mode=auto_mode,
            approved=auto_mode,
            template_source="codemachine",
            template_config=plan.spec,
            runtime_state={"codemachine": {"workflow": plan.workflow, "files": plan.files, "warnings": plan.warnings}},
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
                    status="pending",
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
                metadata={"workflow": plan.workflow, "warnings": plan.warnings, "source": "codemachine"},
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

    from bot import gitops
    from bot.git.names import protocol_name
    from bot.runs import run_names

    settings = ctx["settings"]
    ws = load_workspace(files)
    workflow_file = select_workflow(ws, workflow)
    chosen_engine = engine or settings.engine
    known = set(ctx["engines"].ids()) if "engines" in ctx else {chosen_engine}
    if chosen_engine not in known:
        raise SpecError(f"unknown engine {chosen_engine!r}", errors=[f"engine: unknown {chosen_engine!r}"])
    task = _task(ws, ws.workflows[workflow_file])
    # validate once with a placeholder number so a bad workspace never reaches git or the database
    build_import(ws, workflow_file, protocol_name(1, task), engine=chosen_engine, known_engines=known)
    forge = ctx["forges"].forge_for(project)
    auth = await forge.git_auth_header(ctx["forges"].repo_ref(project))
    mirror = await ctx["git"].ensure_mirror(project.git_url, auth)
    for _ in range(20):
        number = await gitops.next_protocol_number(
            mirror, project.base_branch, await run_names(ctx["db"], project.id)
        )
        plan = build_import(
            ws, workflow_file, protocol_name(number, task), engine=chosen_engine, known_engines=known
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
    from bot.jobs import catalogue as jobs

    await jobs.submit(ctx["redis"], jobs.codemachine_prepare(run.id))
    return run, plan


async def import_local(
    settings: Any,
    workspace: Path,
    repo: Path,
    *,
    base: str | None = None,
    workflow: str | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """`deksdenflow codemachine import`: import into a local repository and write its branch."""
    from bot.local_runtime import drain, local_project, local_runtime
    from bot.runs import load_run

    files = read_workspace_dir(workspace)
    async with local_runtime(settings) as ctx:
        project = await local_project(ctx, repo, base)
        run, plan = await import_workspace(ctx, project, files, workflow=workflow, engine=engine)
        await drain(ctx, project.id)
        state = await load_run(ctx["db"], run.id)
        return {
            "protocol_run_id": run.id,
            "protocol": run.protocol_name,
            "status": state.run.status,
            "workflow": plan.workflow,
            "steps": [s["file"] for s in plan.spec["steps"]],
            "warnings": plan.warnings,
        }


async def api_import(request: Any) -> Any:
    """POST /api/projects/{id}/codemachine/import — body {"files": {path: text}, "workflow"?, "engine"?}.

    The workspace travels in the body (a server-side path would let API callers read the
    server's files). 201 with the run; 422 naming the file and field of a malformed workspace.
    """
    from starlette.responses import JSONResponse

    from bot.errors import NotFound
    from bot.models import Project

    state = request.app.state.df
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        return JSONResponse({"error": "body must be an object with files: {path: text}"}, status_code=422)
    files = body["files"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()) or len(files) > MAX_FILES:
        return JSONResponse({"error": "files must map paths to text"}, status_code=422)
    for key in ("workflow", "engine"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return JSONResponse({"error": f"{key} must be a string"}, status_code=422)
    project_id = int(request.path_params["project_id"])
    access = request.state.access
    if not access.admin and access.project_id != project_id:
        return JSONResponse({"error": "this project token belongs to another project"}, status_code=403)
    ctx = await state.services_ctx()
    async with ctx["db"].sessions() as session:
        project = await session.get(Project, project_id)
    if project is None:
        raise NotFound(f"project {project_id} does not exist")
    # a malformed workspace raises SpecError: `guarded` answers 422 with the errors as detail
    run, plan = await import_workspace(
        ctx,
        project,
        files,
        workflow=body.get("workflow"),
        engine=body.get("engine"),
        auto_mode=bool(body.get("auto", False)),
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


def api_import_endpoint() -> Any:
    """The guarded endpoint for bot.api's route list."""
    from bot.api import guarded

    return guarded(api_import)
