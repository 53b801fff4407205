"""The Local forge: what a real forge would receive is recorded in the database instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from sqlalchemy import JSON, bindparam, cast, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from bot.core.errors import NotFound
from bot.forge.base import (
    CheckReport,
    CommentRef,
    IssueRef,
    Permission,
    PullKind,
    PullRef,
    Reaction,
    RepoFacts,
    RepoRef,
)
from bot.storage.db import Database
from bot.storage.models import ForgeRecord, utcnow
from bot.storage.records import RECORD_KEY, record_insert


def _upsert_statement() -> Any:
    """INSERT .. ON CONFLICT DO UPDATE of one record, built once (bound parameters): a step runs
    five, and building and keying the statement anew each time cost more than sending it."""
    insert = record_insert(pg_insert, body=bindparam("body"))
    # jsonb `||` merges the top-level keys, new ones winning: {**old, **new}
    merged = cast(cast(ForgeRecord.data, JSONB).op("||")(cast(insert.excluded.data, JSONB)), JSON)
    return insert.on_conflict_do_update(
        index_elements=RECORD_KEY,
        set_={
            "body": insert.excluded.body,
            "data": merged,
            "updated_at": insert.excluded.updated_at,
        },
    ).returning(ForgeRecord.id)


_UPSERT = _upsert_statement()


class LocalForge:
    """Forge over a plain git repository: comments, PRs, checks and reactions become rows."""

    provider = "local"
    pull_kind: PullKind = "pull"
    pull_word = "pull request"
    quick_actions: frozenset[str] = frozenset()

    def __init__(self, db: Database, project_id: int) -> None:
        self.db = db
        self.project_id = project_id

    async def _upsert(
        self, kind: str, key: str, body: str = "", data: dict[str, Any] | None = None
    ) -> int:
        """Create the record `(kind, key)` or replace its body and merge `data` into its data.

        On Postgres one statement (an insert that updates on conflict: a step posts five of
        these); SQLite has no shallow JSON merge, so there it reads the row first.
        """
        if self.db.is_sqlite:
            return await self._upsert_read_first(kind, key, body, data)
        values = {"project_id": self.project_id, "kind": kind, "key": key, "body": body}
        async with self.db.one_statement() as conn:
            result = await conn.execute(_UPSERT, {**values, "data": data or {}, "now": utcnow()})
            return int(result.scalar_one())

    async def _upsert_read_first(
        self, kind: str, key: str, body: str, data: dict[str, Any] | None
    ) -> int:
        async with self.db.sessions.begin() as session:
            row = (
                await session.execute(
                    select(ForgeRecord).where(
                        ForgeRecord.project_id == self.project_id,
                        ForgeRecord.kind == kind,
                        ForgeRecord.key == key,
                    )
                )
            ).scalar()
            if row is None:
                row = ForgeRecord(
                    project_id=self.project_id, kind=kind, key=key, body=body, data=data or {}
                )
                session.add(row)
            else:
                row.body = body
                row.data = {**row.data, **(data or {})}
                row.updated_at = utcnow()
            await session.flush()
            return row.id

    async def records(self, kind: str | None = None) -> list[ForgeRecord]:
        async with self.db.sessions() as session:
            query = select(ForgeRecord).where(ForgeRecord.project_id == self.project_id)
            if kind:
                query = query.where(ForgeRecord.kind == kind)
            return list((await session.execute(query.order_by(ForgeRecord.id))).scalars())

    async def add_reaction(self, comment: CommentRef, reaction: Reaction) -> None:
        await self._upsert(
            "reaction",
            f"{comment.comment_id}:{reaction}",
            reaction,
            {"comment": comment.comment_id},
        )

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef:
        async with self.db.sessions() as session:
            count = len(
                (
                    await session.execute(
                        select(ForgeRecord.id).where(ForgeRecord.kind == "comment")
                    )
                ).all()
            )
        record_id = await self._upsert(
            "comment", f"{target.number}:{count + 1}", body, {"issue": target.number}
        )
        return CommentRef(target, record_id)

    async def upsert_status_comment(
        self, target: IssueRef, marker: str, body: str, *, comment_id: int | None = None
    ) -> CommentRef:
        record_id = await self._upsert(
            "status_comment", f"{target.number}:{marker}", body, {"issue": target.number}
        )
        return CommentRef(target, record_id)

    async def open_draft_pr(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str
    ) -> PullRef:
        record_id = await self._upsert(
            "pull", head, body, {"title": title, "base": base, "draft": True, "state": "open"}
        )
        return PullRef(repo, record_id, f"local://{repo.full_name}/pulls/{record_id}", head)

    async def update_pr(
        self, pull: PullRef, *, title: str | None = None, body: str | None = None
    ) -> None:
        async with self.db.sessions.begin() as session:
            row = await session.get(ForgeRecord, pull.number)
            if row is None:
                return
            if body is not None:
                row.body = body
            if title is not None:
                row.data = {**row.data, "title": title}

    async def report_check(self, repo: RepoRef, check: CheckReport) -> None:
        data = dataclasses.asdict(check)
        await self._upsert("check", f"{check.head_sha}:{check.name}", check.summary, data)

    async def get_permission(self, repo: RepoRef, username: str) -> Permission:
        return "admin"  # whoever runs the CLI on their own checkout owns it

    async def git_auth_header(self, repo: RepoRef) -> str | None:
        return None

    # -- what a real forge answers from its API: here the checkout is all there is -----------

    def status_targets(
        self, repo: RepoRef, issue_number: int | None, pull_number: int | None
    ) -> list[IssueRef]:
        # a local run has no issue: its status lives on thread 0, the CLI's view of the run
        targets = [IssueRef(repo, issue_number or 0, "issue")]
        if pull_number:
            targets.append(IssueRef(repo, pull_number, self.pull_kind))
        return targets

    async def describe_repo(self, repo: RepoRef, fallback: RepoFacts) -> RepoFacts | None:
        return None  # the project row already says all a plain checkout could

    async def clone_url(self, repo: RepoRef) -> str | None:
        return repo.full_name  # the checkout's own path is where it is cloned from

    async def own_handles(self) -> tuple[str, ...]:
        return ()

    async def is_self(self, *, author: str = "", author_id: int | None = None) -> bool:
        return False

    async def pull_is_fork(self, repo: RepoRef, number: int) -> bool:
        return False  # a local pull is a branch of the same checkout

    async def pull_branches(self, repo: RepoRef, number: int) -> tuple[str, str]:
        async with self.db.sessions() as session:
            row = await session.get(ForgeRecord, number)
        if row is None or row.kind != "pull":
            raise NotFound(f"no local pull {number}")
        return row.key, str(row.data.get("base") or "")

    async def put_check(
        self, repo: RepoRef, check: CheckReport, *, run_id: int | None = None, lookup: bool = True
    ) -> int | None:
        await self.report_check(repo, check)
        return None

    async def mark_ready(self, pull: PullRef) -> bool:
        async with self.db.sessions.begin() as session:
            row = await session.get(ForgeRecord, pull.number)
            if row is None:
                return False
            row.data = {**row.data, "draft": False}
        return True

    async def review_comments(
        self, repo: RepoRef, number: int, review_id: int
    ) -> list[dict[str, Any]]:
        return []

    async def review_state(self, repo: RepoRef, number: int, review_id: int) -> str:
        return ""

    async def reply_in_thread(
        self, target: IssueRef, thread: str, body: str, *, resolve: bool = False
    ) -> None:
        await self._upsert(
            "reply", f"{target.number}:{thread}", body, {"issue": target.number, "resolve": resolve}
        )

    async def answered_threads(
        self, target: IssueRef, threads: Collection[str], text: str
    ) -> set[str]:
        """The recorded replies say it."""
        sent = {r.key for r in await self.records("reply") if r.body == text}
        return {t for t in threads if f"{target.number}:{t}" in sent}

    async def resolve_threads(
        self, target: IssueRef, threads: Collection[str], comment_ids: Collection[int] = ()
    ) -> int:
        for thread in threads:
            await self._upsert(
                "resolved", f"{target.number}:{thread}", "", {"issue": target.number}
            )
        return len(threads)
