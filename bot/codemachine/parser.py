"""CodeMachine workspaces, parsed (pure): their JS config files and what they declare.

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
from typing import Any

from bot.core.errors import SpecError

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
    """The value a CodeMachine config/workflow file exports; CodeMachineError if unreadable."""
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


def _check_prompt_files(files: Mapping[str, str], file: str, where: str, paths: list[str]) -> None:
    for k, path in enumerate(paths):
        if path.startswith("..") or path not in files:
            at = f"{where}[{k}]" if len(paths) > 1 else where
            raise CodeMachineError(
                file, at, f"prompt file {path!r} does not exist in the workspace"
            )


def _check_main_agent(files: Mapping[str, str], agent: dict[str, Any]) -> None:
    at = f"[{agent['_pos']}]"
    prompts = _str_list(agent.get("promptPath"), MAIN_AGENTS, f"{at}.promptPath", required=True)
    _check_prompt_files(files, MAIN_AGENTS, f"{at}.promptPath", prompts)
    chained = _str_list(
        agent.get("chainedPromptsPath"), MAIN_AGENTS, f"{at}.chainedPromptsPath", required=False
    )
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


def _check_sub_agent(files: Mapping[str, str], sub: dict[str, Any]) -> None:
    at = f"[{sub['_pos']}]"
    paths = _str_list(
        sub.get("mirrorPath") or sub.get("promptPath"),
        SUB_AGENTS,
        f"{at}.mirrorPath",
        required=False,
    )
    _check_prompt_files(files, SUB_AGENTS, f"{at}.mirrorPath", paths)
    sub["_prompts"] = paths


def _check_module(ws: Workspace, module: dict[str, Any]) -> None:
    at = f"[{module['_pos']}]"
    prompts = _str_list(module.get("promptPath"), MODULES, f"{at}.promptPath", required=True)
    _check_prompt_files(ws.files, MODULES, f"{at}.promptPath", prompts)
    module["_prompts"] = prompts
    behavior = module.get("behavior")
    if not isinstance(behavior, dict):
        raise CodeMachineError(MODULES, f"{at}.behavior", "is required (an object with a type)")
    kind = behavior.get("type")
    if kind not in ("loop", "trigger"):
        raise CodeMachineError(
            MODULES, f"{at}.behavior.type", f"must be 'loop' or 'trigger', not {kind!r}"
        )
    if kind == "trigger" and behavior.get("triggerAgentId") is not None:
        target = behavior["triggerAgentId"]
        if target not in ws.main_agents:
            raise CodeMachineError(
                MODULES, f"{at}.behavior.triggerAgentId", f"unknown main agent {target!r}"
            )


def _placeholders(text: str) -> dict[str, dict[str, str]]:
    value = parse_js(text, PLACEHOLDERS)
    if not isinstance(value, dict):
        raise CodeMachineError(PLACEHOLDERS, "module.exports", "must be an object")
    found: dict[str, dict[str, str]] = {}
    for group in ("userDir", "packageDir"):
        entries = value.get(group, {})
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise CodeMachineError(PLACEHOLDERS, group, "must map names to paths")
        found[group] = {k: _clean_rel(v) for k, v in entries.items()}
    return found


def load_workspace(files: Mapping[str, str]) -> Workspace:
    """Parse and check a workspace's config and workflow files."""
    files = {_clean_rel(k): v for k, v in files.items()}
    ws = Workspace(files=dict(files))
    ws.main_agents = _entries(files, MAIN_AGENTS, required=True)
    ws.sub_agents = _entries(files, SUB_AGENTS, required=False)
    ws.modules = _entries(files, MODULES, required=False)
    for agent in ws.main_agents.values():
        _check_main_agent(files, agent)
    for sub in ws.sub_agents.values():
        _check_sub_agent(files, sub)
    for module in ws.modules.values():
        _check_module(ws, module)
    if PLACEHOLDERS in files:
        ws.placeholders.update(_placeholders(files[PLACEHOLDERS]))
    for path in sorted(files):
        if path.startswith(WORKFLOWS_DIR + "/") and path.endswith(".js"):
            ws.workflows[path] = _workflow(ws, path)
    if not ws.workflows:
        raise CodeMachineError(WORKFLOWS_DIR, "", "no workflow template (*.workflow.js)")
    return ws


def _check_options(file: str, at: str, opts: Mapping[str, Any]) -> None:
    for key in ("loopSteps", "loopMaxIterations"):
        if key in opts and (
            isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1
        ):
            raise CodeMachineError(file, f"{at}.{key}", "must be a positive integer")
    for key in ("engine", "model", "agentName", "notCompletedFallback", "modelReasoningEffort"):
        if opts.get(key) is not None and not isinstance(opts[key], str):
            raise CodeMachineError(file, f"{at}.{key}", "must be a string")
    skip = opts.get("loopSkip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise CodeMachineError(file, f"{at}.loopSkip", "must be a list of agent ids")


def _check_call(ws: Workspace, file: str, at: str, call: Any) -> None:
    """One entry of a workflow's steps: a known agent or module, with well-typed options."""
    if not isinstance(call, Call):
        raise CodeMachineError(
            file, at, "must be a resolveStep(), resolveModule() or resolveUI() call"
        )
    if call.function in ("resolveUI", "separator"):
        return
    if call.function == "resolveFolder":
        raise CodeMachineError(file, at, "resolveFolder() is not supported; list the steps")
    if not call.args or not isinstance(call.args[0], str):
        raise CodeMachineError(file, f"{at}", f"{call.function}() needs an agent id")
    ident = call.args[0]
    opts = call.args[1] if len(call.args) > 1 else {}
    if not isinstance(opts, dict):
        raise CodeMachineError(file, f"{at}.options", "must be an object")
    is_step = call.function == "resolveStep"
    table, config = (ws.main_agents, MAIN_AGENTS) if is_step else (ws.modules, MODULES)
    if ident not in table:
        kind = "agent" if is_step else "module"
        raise CodeMachineError(file, f"{at}", f"unknown {kind} {ident!r} (not in {config})")
    _check_options(file, at, opts)


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
        _check_call(ws, file, f"steps[{pos}]", call)
    sub_ids = value.get("subAgentIds", [])
    if not isinstance(sub_ids, list) or not all(isinstance(s, str) for s in sub_ids):
        raise CodeMachineError(file, "subAgentIds", "must be a list of sub-agent ids")
    for k, sub in enumerate(sub_ids):
        if sub not in ws.sub_agents:
            raise CodeMachineError(
                file, f"subAgentIds[{k}]", f"unknown sub-agent {sub!r} (not in {SUB_AGENTS})"
            )
    return value


def select_workflow(ws: Workspace, wanted: str | None) -> str:
    """The workflow file: `wanted` (a name, file name or path), template.json's, or the only one."""
    if wanted is None and TEMPLATE_JSON in ws.files:
        try:
            data = json.loads(ws.files[TEMPLATE_JSON])
        except json.JSONDecodeError as exc:
            raise CodeMachineError(TEMPLATE_JSON, "", f"is not JSON: {exc}") from None
        chosen = (
            data.get("activeTemplate") or data.get("template") if isinstance(data, dict) else None
        )
        if not isinstance(chosen, str):
            raise CodeMachineError(
                TEMPLATE_JSON, "activeTemplate", "must name the selected workflow template"
            )
        wanted = chosen
    if wanted is None:
        if len(ws.workflows) > 1:
            raise CodeMachineError(
                WORKFLOWS_DIR,
                "",
                f"several workflows ({', '.join(sorted(ws.workflows))}): choose one",
            )
        return next(iter(ws.workflows))
    base = posixpath.basename(wanted)
    for path, template in ws.workflows.items():
        stem = posixpath.basename(path).removesuffix(".js").removesuffix(".workflow")
        if wanted in (
            path,
            posixpath.basename(path),
            stem,
            template.get("name"),
        ) or base == posixpath.basename(path):
            return path
    raise CodeMachineError(WORKFLOWS_DIR, "", f"no workflow {wanted!r}")
