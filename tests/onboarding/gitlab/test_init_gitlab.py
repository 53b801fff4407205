"""`/init` on GitLab: a Draft MR with exactly the starter files the repository lacks."""

from __future__ import annotations

from bot.git.onboarding import SETUP_BRANCH, starter_paths
from tests.gitlab_e2e.conftest import World
from tests.gitutil import git


def test_init_note_opens_a_draft_mr_with_the_missing_files(world: World) -> None:
    seed = world.origin.parent / "init-seed"
    git("clone", "-q", str(world.origin), str(seed), cwd=world.origin.parent)
    (seed / ".deksdenflow.yml").write_text("engine: scripted\n")
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "own config", cwd=seed)
    git("push", "-q", "origin", "HEAD:main", cwd=seed)

    note = world.note("/init")
    world.send("Note Hook", note)
    world.wait(lambda: bool(world.events("project.onboarded")), "setup MR")
    [mr] = [
        m for m in world.fake.state.merge_requests.values() if m["source_branch"] == SETUP_BRANCH
    ]
    assert mr["draft"] and mr["title"].startswith("Draft:") and mr["target_branch"] == "main"
    changed = sorted(git("diff", "--name-only", f"main...{SETUP_BRANCH}", cwd=world.origin).split())
    assert changed == sorted(set(starter_paths()) - {".deksdenflow.yml"})
    notes = world.fake.notes_of(world.project, "issues", world.issue["iid"])
    assert any("Setup proposed in" in n["body"] for n in notes)
    world.wait_reaction(note, "eyes")
