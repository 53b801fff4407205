"""Review feedback on the GitLab fake with the product's DEFAULT settings: `@bot plan` plans,
an MR approval approves, the MR leaves draft when the work is done, and diff notes within the
quiet window become one fix step answered (and resolved) in each discussion."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.domain.commands import help_text
from bot.domain.states import ProtocolStatus, StepStatus
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.gitlab.fake_gitlab import BOT_USERNAME
from tests.gitlab_e2e.conftest import PROJECT_ID, SAMPLES, World
from tests.gitutil import git

BOT = f"@{BOT_USERNAME}"


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EngineRequest]]:
    seen: list[EngineRequest] = []
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        seen.append(request)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    yield seen


def mr_note(
    world: World,
    iid: int,
    text: str,
    user: dict[str, Any],
    *,
    path: str = "",
    line: int = 0,
    discussion: str = "",
) -> dict[str, Any]:
    """A Note Hook on the MR (GitLab's documented sample), as a DiffNote when `path` is given."""
    note = world.fake.add_note(world.project, "merge_requests", iid, text, author=user)
    payload: dict[str, Any] = json.loads((SAMPLES / "note_hook__2.json").read_text())
    world._project_fields(payload)
    payload["user"] = world._user(user)
    attrs = payload["object_attributes"]
    attrs.update(
        id=note["id"],
        note=text,
        noteable_type="MergeRequest",
        project_id=PROJECT_ID,
        author_id=user["id"],
    )
    if path:
        world.fake.add_discussion(world.project, iid, discussion)
        attrs.update(
            type="DiffNote",
            discussion_id=discussion,
            position={
                "old_path": path,
                "new_path": path,
                "position_type": "text",
                "old_line": None,
                "new_line": line,
            },
        )
    payload["merge_request"].update(
        iid=iid, source_project_id=PROJECT_ID, target_project_id=PROJECT_ID
    )
    return payload


def approval(world: World, iid: int, user: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((SAMPLES / "merge_request_hook__1.json").read_text())
    world._project_fields(payload)
    payload["user"] = world._user(user)
    payload["object_attributes"].update(
        iid=iid, action="approved", source_project_id=PROJECT_ID, target_project_id=PROJECT_ID
    )
    return payload


def wait_run(world: World, status: str, steps: list[str], timeout: float = 90.0) -> Any:
    """World.wait_run with room for a loaded machine (a fix step waits out the quiet window)."""
    world.wait(
        lambda: (
            world.run() is not None
            and world.run().status == status
            and world.step_statuses() == steps
        ),
        f"protocol {status} with steps {steps}",
        timeout=timeout,
    )
    return world.run()


def mr_of(world: World) -> dict[str, Any]:
    iid = int(world.run().pr_number)
    found: dict[str, Any] = world.fake.state.merge_requests[(PROJECT_ID, iid)]
    return found


def test_mention_plan_mr_approval_ready_and_review_fix(
    world_factory: Callable[..., World], prompts: list[EngineRequest]
) -> None:
    world = world_factory()
    # GitLab strips its own `/approve` from a note: what reaches the bot is the rest of it, and
    # /help says to write `@bot approve` instead
    assert f"`{BOT} approve`" in help_text(forge="gitlab", bot=BOT_USERNAME)
    plan = world.note(f"{BOT} plan greet the world")
    world.send("Note Hook", plan)
    wait_run(world, ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.wait(lambda: world.run().pr_number is not None, "the MR of the plan", timeout=90)
    run = world.run()
    assert run.description == "greet the world"
    iid = int(run.pr_number)
    assert mr_of(world)["draft"] is True

    # a Reporter's approval does not count, a Developer's approves the plan
    world.send("Merge Request Hook", approval(world, iid, world.bob))
    assert not world.run().approved
    world.send("Merge Request Hook", approval(world, iid, world.alice))
    world.wait(lambda: bool(world.run().approved), "approval by review")

    for i in range(2):
        world.send("Note Hook", world.note(f"{BOT} run-step"))
        world.wait(
            lambda i=i: world.step_statuses()[i] == StepStatus.COMPLETED,  # type: ignore[misc]
            f"step {i + 1} done",
            timeout=90,
        )
    wait_run(world, ProtocolStatus.COMPLETED, [StepStatus.COMPLETED, StepStatus.COMPLETED])
    # the last step passed every gate: the MR leaves draft and the status note says what next
    world.wait(lambda: not mr_of(world)["draft"], "MR marked ready")
    assert not mr_of(world)["title"].startswith("Draft:")

    def status_says_ready() -> bool:
        notes = [
            n
            for n in world.fake.notes_of(world.project, "merge_requests", iid)
            if "deksdenflow:status" in n["body"]
        ]
        return bool(notes) and "marked ready for review" in notes[-1]["body"]

    world.wait(status_says_ready, "the status note says what comes next")

    # two diff notes from a Developer within the quiet window, one from a Reporter
    world.send(
        "Note Hook",
        mr_note(
            world,
            iid,
            "Use a comma: `Hello, world!`",
            world.alice,
            path="demo_greeting.py",
            line=4,
            discussion="d-one",
        ),
    )
    world.send("Note Hook", mr_note(world, iid, "Mention the issue here.", world.alice,
                                    path="TASK.md", line=2, discussion="d-two"))  # fmt: skip
    world.send(
        "Note Hook",
        mr_note(
            world, iid, "Remove everything", world.bob, path="TASK.md", line=1, discussion="d-bob"
        ),
    )
    world.wait(lambda: len(world.steps()) == 3, "the fix step", timeout=90)
    wait_run(
        world,
        ProtocolStatus.COMPLETED,
        [StepStatus.COMPLETED, StepStatus.COMPLETED, StepStatus.COMPLETED],
    )
    fix = world.steps()[2]
    assert fix.step_name == "03-review-fix"
    taken = [c["comment_id"] for c in json.loads(fix.runtime_state)["review"]]
    assert len(taken) == 2
    executed = [
        r.prompt for r in prompts if r.phase == "execute" and r.context.get("step_index") == 3
    ]
    assert len(executed) == 1
    for text in (
        "`demo_greeting.py` line 4",
        "Use a comma",
        "`TASK.md` line 2",
        "Mention the issue here.",
    ):
        assert text in executed[0], text
    assert "Remove everything" not in executed[0]
    # GitLab's diff notes carry no hunk: the bot took it from the branch's diff
    assert "@@ " in executed[0]

    # the bot answered in both discussions with the fix's commit and resolved them
    sha = json.loads(fix.runtime_state)["commit_sha"]
    replies = [
        n
        for n in world.fake.notes_of(world.project, "merge_requests", iid)
        if n.get("discussion_id")
    ]
    assert sorted(n["discussion_id"] for n in replies) == ["d-one", "d-two"]
    assert all(sha[:12] in n["body"] for n in replies)
    assert world.fake.state.discussions[(PROJECT_ID, iid, "d-one")] is True
    assert world.fake.state.discussions[(PROJECT_ID, iid, "d-bob")] is False
    # the comments are a typed feedback item too, so any later attempt still has them
    feedback = json.loads(fix.runtime_state)["feedback"]
    assert [i["kind"] for i in feedback] == ["review"] and "Mention the issue here." in feedback[0][
        "body"
    ]
    assert "Review comments this step addresses" in executed[0]

    # a later note in a thread the bot resolved, and the bot's own notes, change nothing
    follow = mr_note(world, iid, "thanks", world.alice, path="TASK.md", line=2, discussion="d-two")
    own = mr_note(
        world, iid, replies[0]["body"], world.fake.bot, path="TASK.md", line=2, discussion="d-one"
    )
    for payload in (follow, own):
        answer = world.send("Note Hook", payload)
        handled = world.delivery_result(answer["id"])["handled"]
        assert {"review": "nothing that counts"} in handled, handled
    assert len(world.steps()) == 3 and world.run().status == ProtocolStatus.COMPLETED

    # GitLab refuses to resolve the next discussion: the reply stands, sent once; the step goes on
    world.fake.fail(
        f"/projects/{PROJECT_ID}/merge_requests/{iid}/discussions/d-three", status=403, method="PUT"
    )
    world.send(
        "Note Hook",
        mr_note(
            world,
            iid,
            "One more: a docstring",
            world.alice,
            path="demo_greeting.py",
            line=1,
            discussion="d-three",
        ),
    )
    world.wait(lambda: len(world.steps()) == 4, "the second fix step", timeout=90)
    wait_run(world, ProtocolStatus.COMPLETED, [StepStatus.COMPLETED] * 4)
    three = [
        n
        for n in world.fake.notes_of(world.project, "merge_requests", iid)
        if n.get("discussion_id") == "d-three"
    ]
    assert len(three) == 1 and "(step 04, the fix for this review)" in three[0]["body"]  # one reply
    assert world.fake.state.discussions[(PROJECT_ID, iid, "d-three")] is False
    assert [e.message for e in world.events("feedback.failed")] == [
        "resolve review threads: GitLabAPIError"
    ]


def test_plain_mr_note_and_stripped_quick_action_change_nothing(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory()
    plan = world.note(f"{BOT} plan")
    world.send("Note Hook", plan)
    wait_run(world, ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.wait(lambda: world.run().pr_number is not None, "the MR of the plan", timeout=90)
    run = world.run()
    iid = int(run.pr_number)
    # `/approve` was GitLab's: the note that reaches the bot holds what was left around it
    answer = world.send("Note Hook", mr_note(world, iid, "Looks good", world.alice))
    result = world.delivery_result(answer["id"])
    assert {"ignored": "no command"} in result["handled"]
    assert not world.run().approved
    # `@bot approve` on the MR is the bot's approve
    approve = mr_note(world, iid, f"{BOT} approve", world.alice)
    world.send("Note Hook", approve)
    world.wait(lambda: bool(world.run().approved), "approval by mention")
    assert len(world.steps()) == 2


def test_mention_plan_on_an_existing_merge_request(
    world_factory: Callable[..., World], tmp_path: Path
) -> None:
    """`@bot plan` on a human's MR plans on its source branch; the MR is the protocol's."""
    world = world_factory()
    work = tmp_path / "clone"
    git("clone", "-q", str(world.origin), str(work), cwd=tmp_path)
    git("checkout", "-q", "-b", "feature-y", cwd=work)
    (work / "y.txt").write_text("y\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "start y", cwd=work)
    git("push", "-q", "origin", "feature-y", cwd=work)
    mr = world.fake.add_merge_request(
        world.project, source_branch="feature-y", title="Feature Y", author=world.alice
    )
    iid = int(mr["iid"])
    plan = mr_note(world, iid, f"{BOT} plan finish feature y", world.alice)
    world.send("Note Hook", plan)
    wait_run(world, ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.wait(lambda: world.run().pr_number is not None, "the MR of the plan", timeout=90)
    run = world.run()
    assert run.pr_number == iid and run.issue_number is None
    assert json.loads(run.runtime_state)["branch"] == "feature-y"
    assert "[protocol-0001/00]" in git("log", "--format=%s", "feature-y", cwd=world.origin)
    assert len(world.fake.state.merge_requests) == 1  # no second MR
    world.send("Note Hook", mr_note(world, iid, f"{BOT} approve", world.alice))
    world.wait(lambda: bool(world.run().approved), "approval on the MR")
