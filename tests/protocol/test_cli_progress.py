"""CLI progress lines (non-TTY), the diff hint, status from anywhere, the per-user data dir, and
one line naming DB_URL when the database is down."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from bot.cli.main import main
from bot.cli.progress import Snapshot, progress_line
from bot.core.settings import Settings, default_data_dir
from engines.scripted import DEFAULT_SCRIPT_PATH
from tests.protocol.test_protocol_cli import repo

__all__ = ["repo"]


def test_progress_line_is_plain_text() -> None:
    snap = Snapshot("executing step 01", "$ pytest -q", 12345, 0.015)
    assert (
        progress_line(snap, 42) == "executing step 01 · $ pytest -q · 42s · 12,345 tokens · $0.0150"
    )
    assert progress_line(Snapshot("planning", "", 0, 0.0), 61) == "planning · 1m 01s · 0 tokens"


def test_non_tty_progress_lines_then_branch_and_diff_hint(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # paced events, so the step runs long enough for progress to see it (polls every 0.5 s)
    script = yaml.safe_load(DEFAULT_SCRIPT_PATH.read_text())
    script["pace_s"] = 0.1
    script["execute"]["default"]["pace_s"] = 0.4
    paced = tmp_path / "paced.yml"
    paced.write_text(yaml.safe_dump(script))
    monkeypatch.setenv("DEKSDENFLOW_SCRIPTED_SCRIPT", str(paced))
    code = main(["protocol", "new", "Add a greeting", "--engine", "scripted", "--run-step"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    progress = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert any(word in " ".join(progress) for word in ("planning", "detailing steps")), err
    executing = [line for line in progress if "executing step 01" in line]
    assert any("$ git status --short" in line or "✎ add TASK.md" in line
               for line in executing), err  # fmt: skip
    assert all(" tokens" in line for line in progress)
    assert "see the changes: git diff main...0001-add-a-greeting" in err
    assert "\x1b[" not in err  # no terminal control codes when stderr is not a terminal

    # from a directory that is no repository, status shows every local repository's protocols
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["protocol", "status"]) == 0
    out, _ = capsys.readouterr()
    assert str(repo) in out and "0001-add-a-greeting" in out
    assert main(["protocol", "status", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "01 completed" in out
    assert not (elsewhere / ".deksdenflow").exists() and not (repo / ".deksdenflow").exists()


def test_data_dir_defaults_to_the_users_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEKSDENFLOW_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Settings().data_dir == tmp_path / "xdg" / "deksdenflow"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir({}) == tmp_path / "home" / ".local" / "share" / "deksdenflow"
    assert default_data_dir({"XDG_DATA_HOME": "relative"}).parts[-3:] == (
        ".local",
        "share",
        "deksdenflow",
    )


# every command that opens the database (doctor reports it as one of its checks instead)
DB_COMMANDS = [
    ["migrate"], ["worker"], ["serve"], ["protocol", "status"], ["protocol", "new", "a task"],
    ["protocol", "run-step", "1"], ["protocol", "qa", "1"], ["report", "--out", "r.html"],
    ["setup"], ["codemachine", "import", "."],
]  # fmt: skip


@pytest.mark.parametrize("command", DB_COMMANDS, ids=" ".join)
def test_an_unreachable_database_is_one_line_naming_db_url(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # a local repository
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", "postgresql://bot:hunter2@127.0.0.1:1/nowhere")
    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    assert main(command) == 1
    _out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "DEKSDENFLOW_DB_URL=postgresql://bot:***@127.0.0.1:1/nowhere" in lines[0]
    assert "hunter2" not in err and "Traceback" not in err
