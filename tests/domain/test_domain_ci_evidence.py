"""Log trimming, error lines, fingerprints and feedback items, on recorded log shapes (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.domain.ci_evidence import (
    EVIDENCE_LIMIT,
    CIEvidence,
    FailedJob,
    clean_github_log,
    clean_gitlab_trace,
    first_error_lines,
    github_failing_section,
    github_job,
    gitlab_job,
    hook_job,
    redacted,
    tail,
    utf8_len,
    within_budget,
)
from bot.domain.fingerprint import failure_fingerprint, normalise_line
from bot.domain.fix_feedback import (
    add_item,
    ci_item,
    guidance_item,
    items_of,
    qa_item,
    render_feedback,
)
from bot.domain.loop_policy import (
    RepoPolicies,
    attempt_text,
    ci_gates,
    default_loop,
    fix_attempt_bound,
    repo_policies,
)
from bot.domain.secrets_scan import SecretScanner

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "ci_logs"


def sample(name: str) -> str:
    return (SAMPLES / name).read_bytes().decode("utf-8")


# -- GitHub Actions job log -------------------------------------------------------------------


def test_github_log_is_cleaned_of_stamps_bom_crlf_and_colours() -> None:
    raw = sample("github_actions_job.log")
    assert raw.startswith("\ufeff2026-") and "\r\n" in raw and "\x1b[" in raw
    cleaned = clean_github_log(raw)
    assert not cleaned.startswith("\ufeff") and "\r" not in cleaned and "\x1b" not in cleaned
    assert "2026-11-30T10:2" not in cleaned
    assert cleaned.splitlines()[0] == "Current runner version: '2.321.0'"


def test_github_failing_section_is_the_step_with_the_error() -> None:
    section = github_failing_section(clean_github_log(sample("github_actions_job.log")))
    lines = section.splitlines()
    assert lines[0] == "▶ Run mkdir -p .deksdenflow-ci && echo test > .deksdenflow-ci/stage"
    assert "E       AssertionError: expected 3, got 4" in lines
    assert lines[-1] == "##[error]Process completed with exit code 1."
    # nothing of the other steps: set-up, checkout, lint, the report step, the cleanup
    for other in (
        "Operating System",
        "Syncing repository",
        "All checks passed!",
        "skip: DEKSDENFLOW",
        "Post job",
    ):
        assert other not in section
    assert "##[endgroup]" not in section


def test_github_log_without_an_error_marker_has_no_section() -> None:
    assert github_failing_section("##[group]Run make\nok\n##[endgroup]\ndone") == ""


def test_github_job_keeps_the_section_annotations_and_first_error_lines() -> None:
    job = github_job(
        "ci",
        "failure",
        output={"title": "1 failed", "summary": "pytest failed", "annotations_count": 1},
        annotations=[
            {
                "path": "tests/test_greeting.py",
                "start_line": 14,
                "annotation_level": "failure",
                "message": "AssertionError: expected 3,\n got 4",
            },
            {
                "path": "x.py",
                "start_line": 1,
                "annotation_level": "notice",
                "message": "just a note",
            },
        ],
        log=sample("github_actions_job.log"),
    )
    assert "E       AssertionError: expected 3, got 4" in job.log
    assert job.annotations == ("tests/test_greeting.py:14: AssertionError: expected 3, got 4",)
    assert job.summary == "1 failed\n\npytest failed"
    assert job.error_lines[0] == "E       AssertionError: expected 3, got 4"
    assert not any("exit code" in x for x in job.error_lines)


# -- GitLab job trace -------------------------------------------------------------------------


def test_gitlab_trace_is_cleaned_of_sections_colours_and_redraws() -> None:
    raw = sample("gitlab_job_trace.log")
    assert "section_start:" in raw and "\x1b[0K" in raw
    cleaned = clean_gitlab_trace(raw)
    assert "section_" not in cleaned and "\x1b" not in cleaned and "\r" not in cleaned
    assert "collected 3 items" in cleaned.splitlines()  # the redrawn "collecting ..." is gone
    assert 'Executing "step_script" stage of the job script' in cleaned
    assert cleaned.splitlines()[-1] == "ERROR: Job failed: exit code 1"


def test_gitlab_job_keeps_the_tail_and_the_first_error_lines() -> None:
    job = gitlab_job("test", "failed", sample("gitlab_job_trace.log"), stage="ci", limit=600)
    assert utf8_len(job.log) <= 600
    assert job.log.startswith("[… ") and job.log.endswith("ERROR: Job failed: exit code 1")
    assert job.summary == "stage: ci"
    assert job.error_lines[:2] == (
        "E       AssertionError: expected 3, got 4",
        "E       assert 4 == 3",
    )


# -- trimming and error lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 100, "short"),
        ("a\nb\nc\n" * 10, 30, None),  # cut: a note, then whole lines from the end
        ("ü" * 100, 41, None),  # never half a character
    ],
)
def test_tail(text: str, limit: int, expected: str | None) -> None:
    out = tail(text, limit)
    assert utf8_len(out) <= limit
    if expected is not None:
        assert out == expected
    else:
        body = out.split("…]\n", 1)[-1]
        assert body and text.endswith(body)


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            "ok\n##[error]Process completed with exit code 2.",
            ("Process completed with exit code 2.",),
        ),
        (
            "Found 0 errors\nsrc/a.py:3: error: Name 'x' is not defined\n",
            ("src/a.py:3: error: Name 'x' is not defined",),
        ),
        (
            "Traceback (most recent call last):\nValueError: bad\n",
            ("Traceback (most recent call last):", "ValueError: bad"),
        ),
        (
            "--- FAIL: TestAdd (0.00s)\n    add_test.go:9: got 4\nFAIL\n",
            ("--- FAIL: TestAdd (0.00s)", "FAIL"),
        ),
        ("all good\n", ()),
    ],
)
def test_first_error_lines(log: str, expected: tuple[str, ...]) -> None:
    assert first_error_lines(log) == expected


# -- fingerprints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("E       AssertionError: expected 3, got 4", "E AssertionError: expected N, got N"),
        ("2026-11-30T10:22:01.2674930Z boom at 10:22:01", "<time> boom at <time>"),
        (
            "FAILED /home/runner/work/x/tests/test_a.py::test_b - KeyError",
            "FAILED <path>::test_b - KeyError",
        ),
        ("object 4f1c0de7a9b3e2d8c6 missing (0xDEADBEEF)", "object <hex> missing (<hex>)"),
        ("id 123e4567-e89b-12d3-a456-426614174000 gone", "id <id> gone"),
        ("see https://ci.example/run/99?x=1 now", "see <url> now"),
        ("C:\\build\\src\\main.c(12): error C2065", "<path>(N): error CN"),
        ("\x1b[31mERROR\x1b[0m   spaced   out", "ERROR spaced out"),
    ],
)
def test_normalise_line(line: str, expected: str) -> None:
    assert normalise_line(line) == expected


def test_fingerprint_ignores_what_changes_between_runs_and_order() -> None:
    a = failure_fingerprint(
        [("tests", ["E AssertionError: expected 3, got 4"]), ("lint", ["src/x.py:1: E501"])]
    )
    b = failure_fingerprint(
        [("lint", ["lib/y/x.py:9: E501"]), ("tests", ["E AssertionError: expected 5, got 7"])]
    )
    assert a == b
    assert a.label == "lint: <path>:N: EN (+1 more failing)"
    assert len(a.digest) == 16


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ([("tests", ["E KeyError: 'name'"])], "another error"),
        ([("unit", ["E AssertionError: expected 3, got 4"])], "another job"),
        ([("tests", [])], "no error line"),
    ],
)
def test_fingerprint_tells_other_failures_apart(
    other: list[tuple[str, list[str]]], why: str
) -> None:
    base = failure_fingerprint([("tests", ["E AssertionError: expected 3, got 4"])])
    assert failure_fingerprint(other).digest != base.digest, why


def test_two_recorded_logs_of_one_failure_share_a_fingerprint_across_forges_runs() -> None:
    gh = github_job("ci", "failure", log=sample("github_actions_job.log"))
    rerun = github_job(
        "ci", "failure", log=sample("github_actions_job.log").replace("got 4", "got 5")
    )
    assert (
        CIEvidence("github-checks", (gh,)).fingerprint()
        == CIEvidence("github-checks", (rerun,)).fingerprint()
    )
    gl = gitlab_job("ci", "failed", sample("gitlab_job_trace.log"))
    assert (
        CIEvidence("gitlab-ci", (gl,)).fingerprint().label
        == "ci: E AssertionError: expected N, got N"
    )


# -- budget, secrets, feedback items ----------------------------------------------------------


def test_evidence_stays_within_the_budget_for_many_jobs() -> None:
    jobs = tuple(FailedJob(f"job-{n}", log="x" * 50_000 + f"\nerror {n}") for n in range(14))
    fitted = within_budget(CIEvidence("gitlab-ci", jobs))
    assert len(fitted.jobs) == 10
    assert sum(utf8_len(j.log) + utf8_len(j.summary) for j in fitted.jobs) <= EVIDENCE_LIMIT
    assert all(j.log.endswith(f"error {n}") for n, j in enumerate(fitted.jobs))


def test_secrets_are_redacted_from_every_text() -> None:
    secret = "s3cr3t-value-0123456789abcdef"
    job = hook_job("test", "test", f"token={secret}\nError: bad {secret}")
    clean = redacted(CIEvidence("ci-hook", (job,)), SecretScanner([secret]).redact)
    assert secret not in repr(clean) and "[REDACTED" in clean.jobs[0].log


def test_feedback_items_are_typed_and_a_new_failure_replaces_the_old() -> None:
    ev = CIEvidence(
        "github-checks", (github_job("ci", "failure", log=sample("github_actions_job.log")),)
    )
    stored = add_item(None, qa_item("# QA\nfindings\nVERDICT: FAIL", 1))
    stored = add_item(stored, guidance_item("alice", "use the <!-- hidden --> helper"))
    stored = add_item(stored, ci_item(ev, 2, "4f1c0de7a9b3e2d8"))
    assert [i.kind for i in items_of(stored)] == ["guidance", "ci_failure"]
    text = render_feedback(stored)
    assert "A human's guidance for this attempt: Guidance from @alice" in text
    assert "use the  helper" in text  # hidden text dropped
    assert "E       AssertionError: expected 3, got 4" in text and "4f1c0de7a9b3" in text
    assert items_of(stored)[1].meta["fingerprint"] == ev.fingerprint().digest
    assert render_feedback("an old plain string") == "### Note: Feedback\n\nan old plain string"
    assert render_feedback(None) == ""


def test_qa_report_item_keeps_the_last_8_kb() -> None:
    report = "# Quality report\n" + "finding line\n" * 2000 + "VERDICT: FAIL\n"
    item = qa_item(report, 1)
    assert utf8_len(item.body) <= 8 * 1024 and item.body.endswith("VERDICT: FAIL")


# -- loop bounds and repository policies ------------------------------------------------------


@pytest.mark.parametrize(
    ("planner", "repo", "env", "expected"),
    [
        (None, None, 2, 2),
        (1, None, 2, 1),
        (5, None, 2, 2),
        (None, 4, 2, 4),
        (0, 4, 2, 0),
        (None, 99, 2, 10),
    ],
)
def test_fix_attempt_bound(planner: int | None, repo: int | None, env: int, expected: int) -> None:
    assert fix_attempt_bound(planner, repo, env) == expected


def test_repo_policies_and_gates() -> None:
    p = repo_policies(
        {
            "policies": {
                "qa_policy": "light",
                "max_tokens": 100,
                "max_fix_attempts": 1,
                "ci_gates": False,
            }
        }
    )
    assert p == RepoPolicies(qa_policy="light", max_tokens=100, max_fix_attempts=1, ci_gates=False)
    assert (
        repo_policies({"policies": {"qa_policy": "sometimes", "max_tokens": -1, "ci_gates": "no"}})
        == RepoPolicies()
    )
    assert ci_gates(p, True) is False and ci_gates(RepoPolicies(), True) is True
    assert default_loop(3, 0) is None
    loop = default_loop(3, 2)
    assert loop is not None and (loop.max_iterations, loop.back_to, loop.on) == (2, 3, "always")
    assert attempt_text(2, 2, "CI failed: ci: E boom") == "attempt 2/3: CI failed: ci: E boom"
    assert attempt_text(5, 2, None) == "attempt 5"


# -- gathering: slow or failing fetches, names only -------------------------------------------


async def test_gathering_survives_a_fetch_that_fails_or_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    from types import SimpleNamespace

    from bot.jobs import ci

    project = SimpleNamespace(secrets={"deploy": "project-secret-value-42"})
    failing = [("tests", "failure")]

    async def broken() -> CIEvidence:
        raise ConnectionError("gone")

    async def hangs() -> CIEvidence:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    async def leaky() -> CIEvidence:
        return CIEvidence(
            "gitlab-ci", (hook_job("tests", "", "Error: token project-secret-value-42"),)
        )

    found = await ci.gather_evidence(project, "gitlab-ci", failing, broken)
    assert found.failing == failing and "could not be fetched: ConnectionError" in found.note
    monkeypatch.setattr(ci, "EVIDENCE_TIMEOUT_S", 0.05)
    found = await ci.gather_evidence(project, "gitlab-ci", failing, hangs)
    assert found.failing == failing and "TimeoutError" in found.note
    found = await ci.gather_evidence(project, "gitlab-ci", failing, leaky)
    assert "project-secret-value-42" not in repr(found) and "[REDACTED]" in found.jobs[0].log
    found = await ci.gather_evidence(project, "ci-hook", failing, None)
    assert found == CIEvidence("ci-hook", (FailedJob("tests"),))


@pytest.mark.parametrize(
    ("body", "step", "text"),
    [
        ("/retry", None, ""),
        ("/retry 2", 2, ""),
        (
            "/retry 2 split on any whitespace, not just spaces",
            2,
            "split on any whitespace, not just spaces",
        ),
        ("/retry use the helper in utils", None, "use the helper in utils"),
    ],
)
def test_retry_takes_a_step_and_guidance(body: str, step: int | None, text: str) -> None:
    from bot.domain.commands import Command, parse_commands

    (cmd,) = parse_commands(body)
    assert isinstance(cmd, Command) and (cmd.name, cmd.step, cmd.text) == ("retry", step, text)


@pytest.mark.parametrize("body", ["/retry 0 x", "/retry -1", "/retry 1.5 please"])
def test_retry_with_a_bad_step_number_is_malformed(body: str) -> None:
    from bot.domain.commands import CommandError, parse_commands

    (err,) = parse_commands(body)
    assert isinstance(err, CommandError) and "positive step number" in err.message


def test_planning_gives_every_step_a_loop_the_model_may_only_lower() -> None:
    from bot.core.errors import SpecError
    from bot.domain.planning import spec_from_planning
    from bot.domain.spec import SpecDefaults, validate_planning_output

    def step(slug: str, bound: object, qa: str = "full") -> dict[str, object]:
        s: dict[str, object] = {
            "slug": slug,
            "title": slug,
            "content": "x",
            "commit_type": "feat",
            "qa_policy": qa,
        }
        if bound != "absent":
            s["max_fix_attempts"] = bound
        return s

    reply = {
        "title": "t",
        "plan": "p",
        "context": "",
        "log": "",
        "setup": "s",
        "steps": [
            step("a", None),
            step("b", 1),
            step("c", 0),
            step("d", 7),
            step("e", "absent", "skip"),
        ],
    }
    planning = validate_planning_output(reply)
    spec = spec_from_planning("0001-task", "task", planning, SpecDefaults(fix_attempts=2))
    assert [s.loop.max_iterations if s.loop else None for s in spec.steps] == [2, 1, None, 2, 2]
    assert all(
        s.loop is None or (s.loop.on, s.loop.back_to) == ("always", s.index) for s in spec.steps
    )
    assert [s.qa.policy for s in spec.steps] == ["full", "full", "full", "full", "skip"]
    # the repository's QA policy replaces the planner's per-step choice
    repo = spec_from_planning(
        "0001-task", "task", planning, SpecDefaults(fix_attempts=3, repo_qa_policy="light")
    )
    assert {s.qa.policy for s in repo.steps} == {"light"} and repo.qa_policy == "light"
    assert [s.loop.max_iterations if s.loop else None for s in repo.steps] == [3, 1, None, 3, 3]
    for bad in (11, -1, "two"):
        with pytest.raises(SpecError):
            validate_planning_output({**reply, "steps": [step("a", bad)]})
