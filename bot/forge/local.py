"""The Local forge: what a real forge would receive is recorded in the database instead."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from bot.db import Database
from bot.forge.base import CheckReport, CommentRef, IssueRef, Permission, PullRef, Reaction, RepoRef
from bot.models import ForgeRecord, utcnow


class LocalForge:
    """Forge over a plain git repository: comments, PRs, checks and reactions become rows."""

    provider = "local"

    def __init__(self, db: Database, project_id: int) -> None:
        self.db = db
        self.project_id = project_id

    async def _upsert(self, kind: str, key: str, body: str = "", data: dict[str, Any] | None = None) -> int:
        async with self.db.sessions.begin() as session:
            row = (
                await session.execute(
                    select(ForgeRecord).where(
                        ForgeRecord.project_id == self.project_id, ForgeRecord.kind == kind, ForgeRecord.key == key
                    )
                )
            ).scalar()
            if row is None:
                row = ForgeRecord(project_id=self.project_id, kind=kind, key=key, body=body, data=data or {})
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
        await self._upsert("reaction", f"{comment.comment_id}:{reaction}", reaction, {"comment": comment.comment_id})

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef:
        async with self.db.sessions() as session:
            count = len((await session.execute(select(ForgeRecord.id).where(ForgeRecord.kind == "comment"))).all())
        record_id = await self._upsert("comment", f"{target.number}:{count + 1}", body, {"issue": target.number})
        return CommentRef(target, record_id)

    async def upsert_status_comment(self, target: IssueRef, marker: str, body: str) -> CommentRef:
        record_id = await self._upsert("status_comment", f"{target.number}:{marker}", body, {"issue": target.number})
        return CommentRef(target, record_id)

    async def open_draft_pr(self, repo: RepoRef, *, head: str, base: str, title: str, body: str) -> PullRef:
        record_id = await self._upsert("pull", head, body, {"title": title, "base": base, "draft": True, "state": "open"})
        return PullRef(repo, record_id, f"local://{repo.full_name}/pulls/{record_id}", head)

    async def update_pr(self, pull: PullRef, *, title: str | None = None, body: str | None = None) -> None:
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
