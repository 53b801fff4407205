"""`deksdenflow protocol new|run-step|qa|status` on a plain local repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bot.cli.main import main
from tests.gitutil import git
from tests.protocol.conftest import one_step_planning, scripted_script


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    git("init", "-q", "-b", "main", cwd=path)
    (path / "README.md").write_text("# cli demo\n")
    git("add", "README.md", cwd=path)
    git("commit", "-q", "-m", "init", cwd=path)
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "df-data"))
    monkeypatch.chdir(path)
    return path


def test_new_with_run_step_then_status(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["protocol", "new", "Add a greeting", "--engine", "scripted", "--run-step"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    # progress while it runs, then the summary
    assert "planning 0001-add-a-greeting" in err
    assert "engine.completed" in err and "qa.verdict" in err and "tokens]" in err
    assert "✓ 0001-add-a-greeting is running" in err
    assert "0001-add-a-greeting  [running]" in out
    assert "01 completed  PASS" in out
    assert "draft PR: [0001-add-a-greeting] Add a greeting (open)" in out
    # the protocol branch is in the repository itself (the Local forge's origin)
    subjects = git("log", "--format=%s", "0001-add-a-greeting", cwd=repo).splitlines()
    assert subjects[0] == "test(qa): quality report for step 01: PASS [protocol-0001/01-qa]"
    assert "docs(record): Record the task [protocol-0001/01]" in subjects
    # the user's checkout is untouched
    assert git("status", "--porcelain", cwd=repo) == ""
    assert git("branch", "--show-current", cwd=repo).strip() == "main"

    assert main(["protocol", "status"]) == 0
    out, _ = capsys.readouterr()
    assert "0001-add-a-greeting" in out and "running" in out

    assert main(["protocol", "status", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "02 pending" in out
    assert "--- status comment ---" in out

    # the next step, by protocol number
    assert main(["protocol", "run-step", "1", "--engine", "scripted"]) == 0
    out, err = capsys.readouterr()
    assert "running step 02" in err
    assert "0001-add-a-greeting  [completed]" in out
    assert "✓ 0001-add-a-greeting is completed" in err


def test_failing_qa_exits_non_zero_with_a_reason(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "failing.yml"
    script.write_text(
        yaml.safe_dump(
            scripted_script(planning=one_step_planning(), qa={"default": {"verdicts": ["FAIL"]}})
        )
    )
    monkeypatch.setenv("DEKSDENFLOW_SCRIPTED_SCRIPT", str(script))
    code = main(["protocol", "new", "Add a greeting", "--engine", "scripted", "--run-step"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "01 failed     FAIL" in out
    # after the default two fix attempts, each shown the failing report
    assert "✗ 0001-add-a-greeting: step 01 used all 2 loop iterations; needs a human" in err


def test_unknown_protocol_and_not_a_repository(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["protocol", "run-step", "7", "--engine", "scripted"]) == 1
    assert "no protocol '7' in this repository" in capsys.readouterr().err
    elsewhere = tmp_path / "plain"
    elsewhere.mkdir()
    assert main(["protocol", "status", "--repo", str(elsewhere)]) == 1
    assert "is not a git repository" in capsys.readouterr().err


def no_protocols(capsys: pytest.CaptureFixture[str]) -> bool:
    assert main(["protocol", "status"]) == 0
    out, _ = capsys.readouterr()
    return "no protocols yet" in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--base", "nope"], {}, "error: base branch 'nope' does not exist in "),
        (["--repo", "/nonexistent/repo"], {}, "error: /nonexistent/repo is not a git repository"),
        (
            ["--engine", "codex"],
            {"DEKSDENFLOW_CODEX_BIN": "/nonexistent/bin/codex"},
            "error: engine codex is not installed: '/nonexistent/bin/codex' was not found",
        ),
    ],
)
def test_new_refuses_in_one_line_and_creates_nothing(
    repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    engine = [] if "--engine" in args else ["--engine", "scripted"]
    code = main(["protocol", "new", "Add a greeting", *engine, *args])
    out, err = capsys.readouterr()
    assert code != 0
    assert err.startswith(message) and err.count("\n") == 1, err
    assert "✓" not in out + err and "planning" not in err
    assert no_protocols(capsys)
    # and the number was not taken: the next good run is 0001
    assert main(["protocol", "new", "Add a greeting", "--engine", "scripted"]) == 0
    assert "planning 0001-add-a-greeting" in capsys.readouterr().err
