"""review_fix: the review comments gathered for a protocol become one fix step; its replies.

Comments wait in Redis (a hash per protocol) until the batch is complete: a GitHub review is
complete when it is submitted, GitLab notes when none came for the quiet window. The job then
writes the fix step's file on the branch, appends the step to the spec and runs it like any
other step. Comments are taken out of the buffer only after the step exists, so a worker that
dies in between leaves them for the next run of the job (which finds the same step file and
commits nothing twice).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from arq import Retry

from bot import git as gitops
from bot.core.errors import NotFound
from bot.domain.fix_feedback import add_item
from bot.domain.loop_policy import default_loop
from bot.domain.review import (
    FIX_SLUG,
    MAX_COMMENTS_PER_STEP,
    ReviewComment,
    fix_step_markdown,
    fix_step_title,
    hunk_for_line,
    reply_body,
    review_feedback,
    threads_to_answer,
    unthreaded_reply,
)
from bot.domain.spec import (
    OutputsSpec,
    ProtocolSpec,
    QASpec,
    StepSpec,
    protocol_dir,
    spec_to_dict,
    step_file_name,
)
from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.base import IssueRef
from bot.git.cache import remote_ref
from bot.jobs.advance import enqueue_next_step
from bot.jobs.boundary import guarded
from bot.jobs.env import JobEnv
from bot.jobs.feedback import forge_of, publish_state
from bot.jobs.locks import lease_alive
from bot.jobs.specs import spec_of
from bot.storage.runs import (
    RunState,
    emit,
    load_run,
    set_protocol_status,
    sync_steps,
    update_run,
    update_step,
)

log = logging.getLogger(__name__)

BUSY_RETRY_S = 10.0  # how soon a fix-step job looks again when a step holds the protocol
KEEP_S = 7 * 24 * 3600  # a buffer nobody flushes (a dead protocol) goes away on its own
# protocol states in which a review can still add work
_OPEN = frozenset(
    {
        ProtocolStatus.PLANNED,
        ProtocolStatus.RUNNING,
        ProtocolStatus.PAUSED,
        ProtocolStatus.BLOCKED,
        ProtocolStatus.COMPLETED,
    }
)


def _keys(run_id: int) -> tuple[str, str, str]:
    base = f"deksdenflow:review:{run_id}"
    return f"{base}:pending", f"{base}:last", f"{base}:taken"


async def buffer_comments(redis: Any, run_id: int, comments: list[ReviewComment]) -> None:
    """Keep comments for the next fix step of `run_id`, and note when the last one came."""
    if not comments:
        return
    pending, last, _ = _keys(run_id)
    await redis.hset(
        pending, mapping={str(c.comment_id): json.dumps(c.to_dict()) for c in comments}
    )
    await redis.set(last, repr(time.time()), ex=KEEP_S)
    await redis.expire(pending, KEEP_S)


async def taken_ids(redis: Any, run_id: int) -> set[int]:
    raw = await redis.smembers(_keys(run_id)[2])
    return {int(v) for v in raw if str(v if isinstance(v, str) else v.decode()).isdigit()}


async def enqueue_flush(redis: Any, run_id: int, key: str, quiet_s: float) -> None:
    """A fix-step job for this batch; with a quiet window, deferred until the window passes."""
    kwargs: dict[str, Any] = {"protocol_run_id": run_id, "quiet_s": quiet_s}
    if quiet_s > 0:
        kwargs["_defer_by"] = quiet_s
    await redis.enqueue_job("review_fix", _job_id=f"review:{run_id}:{key}", **kwargs)


async def review_fix(ctx: dict[str, Any], *, protocol_run_id: int, quiet_s: float = 0.0) -> str:
    redis = ctx["redis"]
    if quiet_s > 0:
        last = await redis.get(_keys(protocol_run_id)[1])
        since = time.time() - float(last or 0)
        if since < quiet_s - 0.05:
            return "waiting"  # a later note's job flushes the batch once it is quiet

    async def body(env: JobEnv) -> str:
        return await _fix(env, protocol_run_id)

    try:
        outcome = await guarded(ctx, "review_fix", protocol_run_id, None, body)
    except Retry:
        # a step is running (it holds the lease, maybe for half an hour): come back later under
        # a new job id rather than spend arq's tries; the comments wait in the buffer meanwhile
        await redis.enqueue_job(
            "review_fix", _job_id=f"review:{protocol_run_id}:later:{time.time_ns()}",
            protocol_run_id=protocol_run_id, _defer_by=BUSY_RETRY_S,
        )  # fmt: skip
        return "busy"
    if outcome.startswith("step "):
        state = await load_run(ctx["db"], protocol_run_id)
        # run the fix now when nothing comes before it; otherwise it waits its turn
        if (
            state.run.approved
            and state.run.status == ProtocolStatus.RUNNING
            and all(s.status == StepStatus.COMPLETED for s in state.steps[:-1])
        ):
            await enqueue_next_step(ctx, protocol_run_id, state)
    return outcome


async def _pending(env: JobEnv, run_id: int) -> list[ReviewComment]:
    pending, _, _ = _keys(run_id)
    raw = await env.redis.hgetall(pending)
    taken = await taken_ids(env.redis, run_id)
    found: list[ReviewComment] = []
    for value in raw.values():
        try:
            comment = ReviewComment.from_dict(json.loads(value))
        except (ValueError, TypeError, AttributeError):
            continue
        if comment is not None and comment.comment_id not in taken:
            found.append(comment)
    # the order the forge had them in (the pure selection sorted them when they came in)
    return sorted(found, key=lambda c: (c.kind != "review", c.path, c.line or 0, c.comment_id))


async def _fix(env: JobEnv, run_id: int) -> str:
    pending = await _pending(env, run_id)
    if not pending:
        return "nothing"
    # a flood of notes makes several steps of bounded size, not one unbounded prompt
    comments, rest = pending[:MAX_COMMENTS_PER_STEP], pending[MAX_COMMENTS_PER_STEP:]
    if rest:
        await enqueue_flush(env.redis, run_id, f"rest-{time.time_ns()}", BUSY_RETRY_S)
    state = await load_run(env.db, run_id)
    if state.run.status not in _OPEN or not state.run.template_config:
        await _take(env, run_id, comments)
        await emit(
            env.db, state, "review.ignored", f"review feedback on a {state.run.status} protocol"
        )
        return f"ignored-{state.run.status}"
    step_spec, new_spec, workdir, comments = await _commit_fix_step(env, state, comments)
    head = await env.push(state, workdir)
    await update_run(env.db, run_id, template_config=spec_to_dict(new_spec), head_sha=head)
    await sync_steps(env.db, run_id, new_spec)
    fresh = await load_run(env.db, run_id)
    step = fresh.step(step_spec.index)
    feedback = add_item(None, review_feedback(comments))
    await update_step(
        env.db,
        step.id,
        runtime_state={"review": [c.to_dict() for c in comments], "feedback": feedback},
    )
    await env.redis.sadd(REPLIES_DUE_KEY, _due_member(run_id, step_spec.index))
    await _take(env, run_id, comments)
    authors = sorted({c.author for c in comments})
    message = (
        f"review feedback from {', '.join('@' + a for a in authors)}: "
        f"{len(comments)} comment(s) → step {step_spec.index:02d}"
    )
    await emit(
        env.db, fresh, "review.fix-step", message, step, comments=[c.comment_id for c in comments]
    )
    if fresh.run.status == ProtocolStatus.COMPLETED:
        await _reopen_for_fix(env, fresh)
    await publish_state(env.ctx, await load_run(env.db, run_id), message)
    return f"step {step_spec.index}"


async def _commit_fix_step(
    env: JobEnv, state: Any, comments: list[Any]
) -> tuple[StepSpec, ProtocolSpec, Path, list[Any]]:
    """Write the fix step (its file and the grown spec) on the protocol branch and commit it."""
    spec = spec_of(state)
    workdir = await env.worktree(state)
    comments = [await _with_hunk(env, state, workdir, c) for c in comments]
    step_spec = fix_step_spec(spec, len(comments))
    name = state.run.protocol_name
    root = workdir / protocol_dir(name)
    root.mkdir(parents=True, exist_ok=True)
    (root / step_spec.file).write_text(
        fix_step_markdown(comments, step_spec.index, state.project.provider)
    )
    new_spec = dataclasses.replace(spec, steps=(*spec.steps, step_spec))
    (root / "spec.json").write_text(json.dumps(spec_to_dict(new_spec), indent=2) + "\n")
    await gitops.commit_all(
        workdir,
        f"chore(protocol): review feedback as step {step_spec.index:02d} of {name}",
        env.settings.bot_name,
        env.settings.bot_email,
    )
    return step_spec, new_spec, workdir, comments


async def _reopen_for_fix(env: JobEnv, fresh: Any) -> None:
    """A completed protocol reopens for review feedback; the fix step runs at once."""
    run_id = fresh.run.id
    # completed only reopens through blocked (as a red CI does); the fix step runs at once
    # the "ready for review" note no longer holds while the fix runs
    runtime = {k: v for k, v in (fresh.run.runtime_state or {}).items() if k != "message"}
    await set_protocol_status(
        env.db,
        run_id,
        ProtocolStatus.BLOCKED,
        "reopened for review feedback",
        runtime_state=runtime,
    )
    await set_protocol_status(env.db, run_id, ProtocolStatus.RUNNING, "running the review fix")


def fix_step_spec(spec: ProtocolSpec, count: int) -> StepSpec:
    """The fix step appended after the last one: it runs and is checked like its neighbours."""
    last = spec.steps[-1] if spec.steps else None
    index = (last.index if last else 0) + 1
    file = step_file_name(index, FIX_SLUG)
    base = StepSpec(
        index=index, slug=FIX_SLUG, title=fix_step_title(count), file=file,
        qa=last.qa if last else dataclasses.replace(_default_qa(spec)),
        outputs=OutputsSpec(protocol=f"{protocol_dir(spec.protocol)}/{file}"), commit_type="fix",
    )  # fmt: skip
    if last is None:
        return base
    # the same bounded fix loop as the planned steps (it redoes the fix step, not the last one)
    loop = default_loop(index, last.loop.max_iterations) if last.loop is not None else None
    return dataclasses.replace(
        base,
        engine=last.engine,
        model=last.model,
        prompt=last.prompt,
        max_tokens=last.max_tokens,
        loop=loop,
    )


def _default_qa(spec: ProtocolSpec) -> Any:
    return QASpec(policy=spec.qa_policy)


async def _with_hunk(
    env: JobEnv, state: RunState, workdir: Path, c: ReviewComment
) -> ReviewComment:
    """GitLab's diff notes name a file and line but carry no hunk: take it from the branch."""
    if c.diff_hunk or not c.path:
        return c

    found = await gitops.run_git(
        [
            "diff",
            "--no-color",
            "--no-ext-diff",
            f"{remote_ref(state.run.base_branch)}...HEAD",
            "--",
            c.path,
        ],
        cwd=workdir,
        timeout=env.settings.git_timeout_s,
        check=False,
    )
    hunk = hunk_for_line(found.out, c.line) if found.returncode == 0 else ""
    return dataclasses.replace(c, diff_hunk=hunk) if hunk else c


async def _take(env: JobEnv, run_id: int, comments: list[ReviewComment]) -> None:
    pending, _, taken = _keys(run_id)
    ids = [str(c.comment_id) for c in comments]
    await env.redis.sadd(taken, *ids)
    await env.redis.expire(taken, KEEP_S)
    await env.redis.hdel(pending, *ids)


REPLIES_DUE_KEY = "deksdenflow:review:replies-due"  # "run:step" of fix steps still to answer
MAX_REPLY_TRIES = 5  # runs of the reply job before a thread that cannot be answered is left


def _due_member(run_id: int, step_index: int) -> str:
    return f"{run_id}:{step_index}"


def answers_review(state: RunState, step_index: int) -> bool:
    """Whether reply_in_threads has threads to answer on the forge for this step."""
    review = (state.step(step_index).runtime_state or {}).get("review")
    return isinstance(review, list) and bool(state.run.pr_number)


async def reply_in_threads(
    ctx: dict[str, Any], run_id: int, step_index: int, state: RunState | None = None
) -> int:
    """Once a fix step's commit is pushed: one reply per thread naming it. Never fails the job.

    Idempotent and resumable: each thread answered is recorded on the step as soon as its reply
    is sent, and the step stays in the replies-due set until every thread is answered, so a
    worker that dies after the push leaves the rest to the reclaim cron's `review_replies` job.
    (A death between one reply's POST and its record can still repeat that one reply.)
    """
    state = state or await load_run(ctx["db"], run_id)
    step = state.step(step_index)
    rs = dict(step.runtime_state or {})
    sha = rs.get("commit_sha")
    review = rs.get("review")
    if not isinstance(review, list) or not state.run.pr_number:  # no fix step: nothing to answer
        await ctx["redis"].srem(REPLIES_DUE_KEY, _due_member(run_id, step_index))
        return 0
    if not isinstance(sha, str):  # not pushed yet: its execution answers once it is
        return 0
    _crash(ctx, "before_review_replies", run_id, step_index)
    comments = [c for c in (ReviewComment.from_dict(d) for d in review if isinstance(d, dict)) if c]
    answered, rs, complete = await _answer_threads(ctx, state, step, rs, comments, sha)
    loose = unthreaded_reply(comments, sha, step_index)
    if loose is not None and not rs.get("review_answered_pr"):
        if await _answer_on_pr(ctx, state, loose):
            rs = {**rs, "review_answered_pr": True}
            await update_step(ctx["db"], step.id, runtime_state=rs)
            answered += 1
        else:
            complete = False
    await _resolve_threads(ctx, state, step, rs, comments)
    if complete:
        await ctx["redis"].srem(REPLIES_DUE_KEY, _due_member(run_id, step_index))
    return answered


def _crash(ctx: dict[str, Any], where: str, run_id: int, step_index: int) -> None:
    hook = ctx.get("crash_hook")
    if hook is not None:  # tests stand for a worker dying here
        hook(where, run_id, step_index)


async def _answer_threads(
    ctx: dict[str, Any],
    state: RunState,
    step: Any,
    rs: dict[str, Any],
    comments: list[ReviewComment],
    sha: str,
) -> tuple[int, dict[str, Any], bool]:
    """Reply in each thread not answered yet; (replies sent, the step's state, all answered)."""
    done = {str(t) for t in rs.get("review_replied") or []}
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    number = state.run.pr_number
    assert number is not None
    body = reply_body(sha, step.step_index)
    rs, done = await _sent_unrecorded(ctx, state, step, rs, done, body)
    answered, complete = 0, True
    for thread, _comment in threads_to_answer(comments):
        if thread in done:
            continue
        # the intent first: a run that dies after the POST finds its reply (on GitHub) by it
        rs = {**rs, "review_replying": sorted({*(rs.get("review_replying") or []), thread})}
        await update_step(ctx["db"], step.id, runtime_state=rs)
        try:
            # replies only: resolving is a separate best-effort pass (_resolve_threads), so a
            # refused resolve never makes a reply be sent twice
            await forge.reply_in_thread(IssueRef(repo, number, forge.pull_kind), thread, body)
        except Exception as exc:  # a reply is a courtesy: the fix is pushed either way
            log.warning("review reply on %s failed: %s", thread, exc)
            await emit(
                ctx["db"], state, "feedback.failed", f"review reply: {type(exc).__name__}", step
            )
            complete = False
            continue
        _crash(ctx, "after_review_post", state.run.id, step.step_index)
        done.add(thread)
        answered += 1
        rs = {**rs, "review_replied": sorted(done)}
        await update_step(ctx["db"], step.id, runtime_state=rs)
        _crash(ctx, "after_review_reply", state.run.id, step.step_index)
    return answered, rs, complete


async def _sent_unrecorded(
    ctx: dict[str, Any], state: RunState, step: Any, rs: dict[str, Any], done: set[str], body: str
) -> tuple[dict[str, Any], set[str]]:
    """Threads a dead run replied in without recording it, as far as the forge can tell (GitHub
    reads its review threads in one GraphQL query; GitLab does not say, so there such a reply
    can be sent twice). Asked only when such a thread may exist."""
    unsure = {str(t) for t in rs.get("review_replying") or []} - done
    if not unsure:
        return rs, done
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    assert state.run.pr_number is not None  # the caller answers threads on this PR/MR
    try:
        found = await forge.answered_threads(
            IssueRef(repo, state.run.pr_number, forge.pull_kind), unsure, body
        )
    except Exception as exc:  # unknown: reply again rather than leave a thread unanswered
        log.warning("looking for unrecorded review replies failed: %s", exc)
        return rs, done
    if not found:
        return rs, done
    done = done | found
    rs = {**rs, "review_replied": sorted(done)}
    await update_step(ctx["db"], step.id, runtime_state=rs)
    return rs, done


async def _answer_on_pr(ctx: dict[str, Any], state: RunState, text: str) -> bool:
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    assert state.run.pr_number is not None
    try:
        await forge.post_comment(IssueRef(repo, state.run.pr_number, forge.pull_kind), text)
    except Exception as exc:  # a courtesy, as above
        log.warning("review answer on the PR failed: %s", exc)
        return False
    return True


async def _resolve_threads(
    ctx: dict[str, Any],
    state: RunState,
    step: Any,
    rs: dict[str, Any],
    comments: list[ReviewComment],
) -> None:
    """Resolve the threads just answered, each forge its own way (`Forge.resolve_threads`).

    Apart from the replies, so a refused resolve never makes a reply be sent twice; best-effort:
    a failure is logged and shown as an event, the thread stays open for a human, and each
    thread is tried once (recorded in `review_resolved` before asking the forge).
    """
    replied = {str(t) for t in rs.get("review_replied") or []}
    tried = {str(t) for t in rs.get("review_resolved") or []}
    todo = sorted(replied - tried)
    if not todo:
        return
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    number = state.run.pr_number
    assert number is not None  # the caller answered threads on this PR/MR
    await update_step(
        ctx["db"], step.id, runtime_state={**rs, "review_resolved": sorted(tried | set(todo))}
    )
    target = IssueRef(repo, number, forge.pull_kind)
    in_threads = {c.comment_id for c in comments if c.thread_id in todo}
    try:
        resolved = await forge.resolve_threads(target, todo, in_threads)
    except Exception as exc:  # the replies are there; an open thread only waits for a human
        log.warning("resolving review threads of step %s failed: %s", step.step_index, exc)
        await emit(
            ctx["db"],
            state,
            "feedback.failed",
            f"resolve review threads: {type(exc).__name__}",
            step,
        )
        return
    if resolved:
        await emit(
            ctx["db"], state, "review.resolved", f"resolved {resolved} review thread(s)", step
        )


async def review_replies(ctx: dict[str, Any], *, protocol_run_id: int, step_index: int) -> str:
    """The replies of a fix step whose worker died after its push (queued by reclaim_expired)."""
    redis = ctx["redis"]
    member = _due_member(protocol_run_id, step_index)
    tries_key = f"deksdenflow:review:reply-tries:{member}"
    tries = int(await redis.incr(tries_key))
    await redis.expire(tries_key, KEEP_S)
    try:
        answered = await reply_in_threads(ctx, protocol_run_id, step_index)
    except NotFound:  # the run or step is gone: nothing to answer
        await redis.srem(REPLIES_DUE_KEY, member)
        return "gone"
    if tries >= MAX_REPLY_TRIES and await redis.sismember(REPLIES_DUE_KEY, member):
        await redis.srem(REPLIES_DUE_KEY, member)  # the forge keeps refusing: stop asking it
        state = await load_run(ctx["db"], protocol_run_id)
        await emit(
            ctx["db"],
            state,
            "review.replies-abandoned",
            f"gave up after {tries} tries",
            state.step(step_index),
        )
        return "abandoned"
    return f"answered {answered}"


async def replies_due(ctx: dict[str, Any]) -> list[tuple[int, int]]:
    """(run id, step index) of pushed fix steps with threads left to answer and no job on them."""

    found: list[tuple[int, int]] = []
    for raw in await ctx["redis"].smembers(REPLIES_DUE_KEY):
        member = raw.decode() if isinstance(raw, bytes) else str(raw)
        run_text, _, step_text = member.partition(":")
        if not (run_text.isdigit() and step_text.isdigit()):
            await ctx["redis"].srem(REPLIES_DUE_KEY, raw)
            continue
        run_id, step_index = int(run_text), int(step_text)
        if await lease_alive(ctx["redis"], run_id):
            continue  # a job holds the protocol: it answers, or leaves it for a later tick
        try:
            state = await load_run(ctx["db"], run_id)
            step = state.step(step_index)
        except NotFound:
            await ctx["redis"].srem(REPLIES_DUE_KEY, raw)
            continue
        pushed = isinstance((step.runtime_state or {}).get("commit_sha"), str)
        if pushed and step.status != StepStatus.RUNNING:
            found.append((run_id, step_index))  # pushed and recorded: only the replies are missing
        elif not pushed and state.run.status == ProtocolStatus.CANCELLED:
            await ctx["redis"].srem(REPLIES_DUE_KEY, raw)  # the fix never ran: nothing to answer
    return found


def resolved_threads(state: RunState) -> set[str]:
    """Threads the bot answered (and on GitLab resolved) for this protocol's fix steps."""
    found: set[str] = set()
    for step in state.steps:
        replied = (step.runtime_state or {}).get("review_replied")
        if isinstance(replied, list):
            found.update(str(t) for t in replied)
    return found
