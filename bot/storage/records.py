"""Prebuilt statements over forge_records, shared by the Local forge and the forge-id memos."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam

from bot.storage.models import ForgeRecord

# the unique key of a record: what ON CONFLICT names
RECORD_KEY = (ForgeRecord.project_id, ForgeRecord.kind, ForgeRecord.key)


def record_insert(insert: Callable[[Any], Any], **values: Any) -> Any:
    """`insert(ForgeRecord)` of one record from bound parameters (project_id, kind, key, data,
    now, and any of `values`), for a dialect's insert (Postgres or SQLite): built once, it is
    reused with new parameters instead of being built and keyed for every write."""
    c = ForgeRecord.__table__.c
    return insert(ForgeRecord).values(
        project_id=bindparam("project_id"),
        kind=bindparam("kind"),
        key=bindparam("key"),
        data=bindparam("data", type_=c.data.type),
        created_at=bindparam("now", type_=c.created_at.type),
        updated_at=bindparam("now", type_=c.updated_at.type),
        **values,
    )
