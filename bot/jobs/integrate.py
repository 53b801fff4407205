"""Integration: a step of a graph that passed its gates is merged into the protocol branch.

The merge is a merge commit carrying the step's trailer; the child branch is deleted after.
A conflict blocks nobody else: it adds an integration step, cut from the protocol branch like
any step, whose attempt starts by merging the conflicting branch (markers left in the files)
and whose engine resolves them with both sides' intents in its step file. QA and CI gate it as
usual; when it is merged, the step it integrates counts as merged too. Runs under the
protocol's integration lock (schedule.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from bot import git as gitops
from bot.core.errors import GitError
from bot.domain.graph import child_branch
from bot.domain.spec import (
    OutputsSpec,
    ProtocolSpec,
    StepSpec,
    spec_to_dict,
    step_file_name,
    validate_spec,
)
from bot.jobs.env import JobEnv
from bot.jobs.specs import read, spec_of
from bot.storage.models import StepRun
from bot.storage.runs import RunState, emit, load_run, sync_steps, update_run, update_step

log = logging.getLogger(__name__)

# log.md is appended to by every step, and the QA report rewritten by every QA: two steps side
# by side always both touch them, and keeping both sides' lines is the right merge for these
ATTRIBUTES = ".protocols/**/log.md merge=union\n.protocols/**/quality-report.md merge=union\n"


def integrated(step: StepRun) -> bool:
    """Whether this attempt of the step is merged into the protocol branch."""
    return (step.runtime_state or {}).get("integrated_attempt") == step.retries


def waits_for_integration(step: StepRun) -> bool:
    """Whether this attempt conflicted and an integration step merges it."""
    rs = step.runtime_state or {}
    return rs.get("integration_step") is not None and rs.get("integration_attempt") == step.retries


def merge_trailer(number: int, step_index: int) -> str:
    return f"Protocol-Step: protocol-{number:04d}/{step_index:02d}"


def _attributes(env: JobEnv) -> Path:
    path = Path(env.settings.data_dir) / "integration.gitattributes"
    if not path.exists() or path.read_text() != ATTRIBUTES:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ATTRIBUTES)
    return path


async def merge(env: JobEnv, workdir: Path, ref: str, message: str | None) -> list[str]:
    """Merge `ref` into HEAD: committed with `message`, or left uncommitted (None). Returns the
    conflicted paths ([] = merged); a committing merge that conflicts is aborted."""
    s = env.settings
    ident = {"GIT_AUTHOR_NAME": s.bot_name, "GIT_AUTHOR_EMAIL": s.bot_email,
             "GIT_COMMITTER_NAME": s.bot_name, "GIT_COMMITTER_EMAIL": s.bot_email}  # fmt: skip
    how = ["--no-commit"] if message is None else ["-m", message]
    res = await gitops.run_git(
        ["merge", "--no-ff", "--quiet", *how, "--end-of-options", ref],
        cwd=workdir, env=ident, timeout=s.git_timeout_s, check=False,
        config={"commit.gpgsign": "false", "core.attributesFile": str(_attributes(env))},
    )  # fmt: skip
    if res.returncode == 0:
        return []
    listed = await gitops.run_git(
        ["diff", "-z", "--name-only", "--diff-filter=U"], cwd=workdir, timeout=s.git_timeout_s
    )
    conflicts = [p for p in listed.out.split("\0") if p]  # NUL-separated: names may hold spaces
    if message is not None:
        await gitops.run_git(
            ["merge", "--abort"], cwd=workdir, timeout=s.git_timeout_s, check=False
        )
    if not conflicts:
        said = next((line for line in (res.err or res.out).splitlines() if line.strip()), "")
        raise GitError(f"git merge of {ref} failed: {said}")
    return conflicts


async def integrate_step(
    env: JobEnv, state: RunState, step_index: int, merged: list[str] | None = None
) -> str:
    """Merge the step's branch into the protocol branch: "merged", "conflict" or "nothing".

    The merged child branches are appended to `merged` for the caller to delete once it let go
    of the integration lock (deleting is slow and nobody waits for it); without a list they are
    deleted here.
    """
    step = state.step(step_index)
    if integrated(step) or waits_for_integration(step):  # merged already, or being merged by hand
        return "nothing"
    child = child_branch(state.run.protocol_name, step_index)
    workdir = await env.worktree(state)  # the protocol branch, fetched
    await gitops.run_git(
        ["reset", "--hard", "--quiet", "HEAD"], cwd=workdir, timeout=env.settings.git_timeout_s
    )
    ref = gitops.remote_ref(child)
    await emit(
        env.db,
        state,
        "step.integrating",
        f"merging step {step_index:02d} into the protocol branch",
        step,
    )
    if not await _exists(env, workdir, ref):
        await _mark(env, state, step_index, None)  # accepted by a human without a branch
        return "nothing"
    title = state.step(step_index).summary or f"step {step_index:02d}"
    trailer = merge_trailer(state.number, step_index)
    message = f"merge: step {step_index:02d} {title} into {state.run.protocol_name}\n\n{trailer}\n"
    conflicts = await merge(env, workdir, ref, message)
    if conflicts:
        await add_integration_step(env, state, step_index, conflicts)
        return "conflict"
    head = await env.push(state, workdir)
    await update_run(env.db, state.run.id, head_sha=head)
    await _mark(env, state, step_index, head)
    done = [child]
    source = (step.runtime_state or {}).get("integrates")
    while isinstance(source, int) and source not in done_steps(done, state):
        # an integration step: the step it resolved is merged with it (and, when that step was
        # itself an integration step whose merge conflicted again, the one before it too)
        await _mark(env, state, source, head)
        done.append(child_branch(state.run.protocol_name, source))
        source = (state.step(source).runtime_state or {}).get("integrates")
    if merged is not None:
        merged.extend(done)
    else:
        for branch in done:
            await drop_child(env, state, branch)
    return "merged"


def done_steps(branches: list[str], state: RunState) -> set[int]:
    return {
        int(b.rsplit("--", 1)[1]) for b in branches if b.startswith(state.run.protocol_name + "--")
    }


async def _exists(env: JobEnv, workdir: Path, ref: str) -> bool:
    res = await gitops.run_git(
        ["rev-parse", "--verify", "--quiet", ref + "^{commit}"],
        cwd=workdir,
        timeout=env.settings.git_timeout_s,
        check=False,
    )
    return res.returncode == 0


async def _mark(env: JobEnv, state: RunState, step_index: int, head: str | None) -> None:
    step = state.step(step_index)
    rs = {**(step.runtime_state or {}), "integrated_attempt": step.retries, "merge_sha": head}
    await update_step(env.db, step.id, runtime_state=rs)
    step.runtime_state = rs
    await emit(
        env.db,
        state,
        "step.integrated",
        f"step {step_index:02d} merged into the protocol branch",
        step,
        sha=head,
    )


async def drop_child(env: JobEnv, state: RunState, branch: str) -> None:
    """Delete the merged child branch on the forge, and its worktree here."""
    workdir = env.git.mirror_path(state.project.git_url)
    url = gitops.normalize_remote(state.project.git_url)
    header = await gitops.resolve_auth(env.auth(state))
    try:
        await gitops.run_git(
            ["push", "--quiet", "--no-verify", "--end-of-options", url, f":refs/heads/{branch}"],
            cwd=workdir, auth_header=header, timeout=env.settings.git_timeout_s, remote=url,
            credential_hosts=env.git.credential_hosts,
        )  # fmt: skip
        await gitops.run_git(
            ["update-ref", "-d", gitops.remote_ref(branch)],
            cwd=workdir,
            timeout=env.settings.git_timeout_s,
            check=False,
        )
        await env.git.remove_worktree(state.project.git_url, branch)
    except Exception:  # the merge stands: a branch left behind is only untidy
        log.warning("could not delete branch %s", branch, exc_info=True)


async def add_integration_step(
    env: JobEnv, state: RunState, step_index: int, conflicts: list[str]
) -> int:
    """A new step that merges `step_index`'s branch into the protocol branch by hand."""
    spec = spec_of(state)
    source = spec.step(step_index)
    index = max(s.index for s in spec.steps) + 1
    slug = f"integrate-{step_index:02d}"
    file = step_file_name(index, slug)
    new = StepSpec(
        index=index,
        slug=slug,
        title=f"Integrate step {step_index:02d}: {source.title}"[:200],
        file=file,
        qa=source.qa,
        outputs=OutputsSpec(protocol=f"{spec_dir(spec)}/{file}"),
        step_type="integration",
        commit_type="fix",
        engine=source.engine,
        model=source.model,
        depends_on=spec.dependencies()[step_index],
    )
    grown = validate_spec(spec_to_dict(dataclasses.replace(spec, steps=(*spec.steps, new))))
    await update_run(env.db, state.run.id, template_config=spec_to_dict(grown))
    await sync_steps(env.db, state.run.id, grown)
    fresh = await load_run(env.db, state.run.id)
    await update_step(
        env.db,
        fresh.step(index).id,
        runtime_state={"integrates": step_index, "conflicts": conflicts},
    )
    src = fresh.step(step_index)
    rs = {
        **(src.runtime_state or {}),
        "integration_step": index,
        "integration_attempt": src.retries,
    }
    await update_step(env.db, src.id, runtime_state=rs)
    shown = ", ".join(conflicts[:10])
    await emit(
        env.db,
        fresh,
        "step.conflict",
        f"step {step_index:02d} conflicts with the protocol branch ({shown}): "
        f"step {index:02d} integrates it",
        src,
        conflicts=conflicts,
        integration_step=index,
    )
    return index


def spec_dir(spec: ProtocolSpec) -> str:
    return f".protocols/{spec.protocol}"


async def prepare_attempt(env: JobEnv, state: RunState, step: StepSpec, workdir: Path) -> None:
    """An integration step's attempt starts with the conflicting merge in its worktree, and a
    step file that carries both sides' intents (the engine's prompt includes it)."""
    if step.step_type != "integration":
        return
    source = (state.step(step.index).runtime_state or {}).get("integrates")
    if not isinstance(source, int):
        return
    ref = gitops.remote_ref(child_branch(state.run.protocol_name, source))
    conflicts = await merge(env, workdir, ref, None)
    root = workdir / spec_dir_of(state)
    root.mkdir(parents=True, exist_ok=True)
    (root / step.file).write_text(intents(state, source, conflicts, root))


def spec_dir_of(state: RunState) -> str:
    return f".protocols/{state.run.protocol_name}"


def intents(state: RunState, source: int, conflicts: list[str], root: Path) -> str:
    """The integration step's file: what each side meant, and where they collide."""
    spec = spec_of(state)
    ancestors = _ancestors(spec.dependencies(), source)
    merged = [
        s
        for s in spec.steps
        if s.index not in ancestors
        and s.index != source
        and s.step_type != "integration"
        and (state.step(s.index).runtime_state or {}).get("integrated_attempt")
        == state.step(s.index).retries
    ]
    mine = spec.step(source)
    parts = [
        f"# Integrate step {source:02d} into the protocol branch\n",
        f"Step {source:02d}'s branch and the protocol branch changed the same lines. "
        "The merge is under "
        "way in this worktree; the conflicted files hold both sides between conflict markers:\n",
        *(f"- `{path}`" for path in conflicts),
        "\nResolve every conflict so that both intents below hold, remove every conflict marker, "
        "and keep the project building and its tests passing. Change nothing else.\n",
        f"## Step {source:02d} (being merged): {mine.title}\n\n{read(root / mine.file)}",
    ]
    for s in merged:
        parts.append(
            f"## Step {s.index:02d} (already on the protocol branch): {s.title}\n\n"
            f"{read(root / s.file)}"
        )
    return "\n".join(parts) + "\n\n## Notes\n"


def _ancestors(deps: dict[int, tuple[int, ...]], index: int) -> set[int]:
    seen: set[int] = set()
    todo = list(deps.get(index, ()))
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(deps.get(i, ()))
    return seen


# the lines git writes around a conflict (`|||||||` with merge.conflictStyle=diff3)
_MARKERS = frozenset({"<<<<<<<", "|||||||", "=======", ">>>>>>>"})
_MARKER_SCAN_BYTES = 4 * 1024 * 1024


def marker_lines(text: str) -> list[int]:
    """The 1-based numbers of lines that start with a conflict marker: seven `<`, `|`, `=` or `>`
    followed by a space, a tab or the line's end (eight `=` are a heading, not a marker)."""
    return [
        n
        for n, line in enumerate(text.splitlines(), start=1)
        if line[:7] in _MARKERS and (len(line) == 7 or line[7] in " \t")
    ]


def leftover_markers(state: RunState, step: StepSpec, workdir: Path) -> str | None:
    """Why an integration step's attempt must not be committed: conflict markers still in the
    files its merge conflicted on (None: none left). The engine is not trusted to have resolved
    them; a file it deleted is a resolution, and a symlink or a path outside the worktree is
    not read (the model may have put either there)."""
    if step.step_type != "integration":
        return None
    conflicts = (state.step(step.index).runtime_state or {}).get("conflicts")
    root = workdir.resolve()
    found: list[str] = []
    for path in conflicts if isinstance(conflicts, list) else []:
        file = workdir / str(path)
        if file.is_symlink() or not file.is_file() or not file.resolve().is_relative_to(root):
            continue
        with file.open("rb") as fh:
            text = fh.read(_MARKER_SCAN_BYTES).decode("utf-8", errors="replace")
        lines = marker_lines(text)
        if lines:
            shown = ", ".join(str(n) for n in lines[:5]) + (", …" if len(lines) > 5 else "")
            found.append(f"{path} (line {shown})")
    if not found:
        return None
    return (
        f"step {step.index:02d} left conflict markers in {'; '.join(found[:5])}: nothing was "
        "committed; /retry runs the integration again"
    )
