"""Group commits on Postgres through one held psycopg connection and one prepared statement.

Through SQLAlchemy a batch cost a pool checkout (with its pre-ping round trip), compiling a
multi-row INSERT whose text changes with the batch size (so nothing could be prepared), a
BEGIN/COMMIT pair, and the JSON type's re-serialisation of every row. Here a batch is one
statement with the same text for any size: arrays of column values (binary format, nothing to
escape in a 4 KB body) unnested into an INSERT … ON CONFLICT DO NOTHING RETURNING, prepared
once per connection. In autocommit mode that statement is its own transaction: when it
returns, its rows are committed, and with `synchronous_commit` on (set on the connection, so
a server default of off cannot weaken it) that means flushed to the WAL on disk.

A batch goes in first as a plain INSERT: ON CONFLICT DO NOTHING makes every row a speculative
insertion (both unique indexes searched before the insert, then a second WAL record to
confirm it), about a tenth of the server's CPU per delivery. A batch that meets a stored key
fails whole (its transaction stores nothing) and goes again with ON CONFLICT DO NOTHING.

The connection is the one `postgres_connector` makes for the engine, so every statement has
the same client-side deadline (a hung server costs one deadline, then a fresh connection).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import psycopg.errors
from psycopg.adapt import Buffer, Dumper
from psycopg.pq import Format

from bot.storage.models import WebhookDelivery

if TYPE_CHECKING:
    from bot.storage.intake import Stored, _Pending

log = logging.getLogger(__name__)

_TABLE = WebhookDelivery.__tablename__

# The body is stored as it came (text, already checked to be UTF-8 JSON of sane depth), the
# kept headers as json text; `received_at` is the transaction's time, as one batch shares one.
INSERT_BATCH = f"""
INSERT INTO {_TABLE}
    (provider, delivery_key, event, action, status, payload, headers, semantic_key, outcome,
     attempts, received_at)
SELECT provider, delivery_key, event, action, status, payload, headers::json, semantic_key,
       '{{}}'::json, 0, now()
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::text[], %b::text[], %b::text[])
    AS batch(provider, delivery_key, event, action, status, payload, headers, semantic_key)
ON CONFLICT DO NOTHING
RETURNING id, provider, delivery_key
"""

# the same without ON CONFLICT: what an all-new batch (the usual one) costs the server least
INSERT_NEW = INSERT_BATCH.replace("ON CONFLICT DO NOTHING\n", "")

# the rows that kept a batch's rows out: stored earlier under the same delivery or semantic key
FIND_STORED = f"""
SELECT id, provider, delivery_key, semantic_key FROM {_TABLE}
WHERE delivery_key = ANY(%b::text[]) OR semantic_key = ANY(%b::text[])
"""

Connect = Callable[[], Awaitable["psycopg.AsyncConnection[Any]"]]

_TEXT_OID = 25
_TEXT_ARRAY_OID = 1009
_ARRAY_HEAD = struct.Struct("!iiIii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY_ARRAY = struct.pack("!iiI", 0, 0, _TEXT_OID)
_NULL = b"\xff\xff\xff\xff"  # an element's length of -1


class TextArray(list[str | None]):
    """A list sent as one binary `text[]` parameter by `TextArrayDumper`."""


class TextArrayDumper(Dumper):
    """`text[]` in Postgres's binary array format, built in one pass.

    psycopg's generic list dumper looks at the elements to choose their dumper and then dumps
    each through it: on the uvloop server a batch's eight arrays cost about as much CPU as the
    batch's requests spent verifying their signatures. The intake's arrays are always
    one-dimensional text (or NULL), so the format is a fixed header and a length per element.
    """

    format = Format.BINARY
    oid = _TEXT_ARRAY_OID

    def dump(self, obj: list[str | None]) -> Buffer:
        if not obj:
            return _EMPTY_ARRAY
        parts = [b""]
        append = parts.append
        has_null = 0
        for value in obj:
            if value is None:
                append(_NULL)
                has_null = 1
            else:
                data = value.encode()
                append(len(data).to_bytes(4, "big"))
                append(data)
        parts[0] = _ARRAY_HEAD.pack(1, has_null, _TEXT_OID, len(obj), 1)
        return b"".join(parts)


def batch_columns(items: Sequence[_Pending]) -> list[TextArray]:
    """The INSERT's eight parameter arrays, one per column, in batch order (pure)."""
    columns = [TextArray() for _ in range(8)]
    provider, key, event, action, status, payload, headers, semantic = columns
    for item in items:
        d = item.delivery
        provider.append(d.provider)
        key.append(d.key)
        event.append(d.event)
        action.append(d.action)
        status.append(item.status)
        payload.append(d.body)
        headers.append(orjson.dumps(d.headers).decode())
        semantic.append(d.semantic_key)
    return columns


def resolve(
    items: Sequence[_Pending],
    inserted: dict[tuple[str, str], int],
    stored: Sequence[tuple[int, str, str, str | None]],
) -> Stored:
    """(row id, inserted now) per item, from the RETURNING rows and the earlier rows (pure).

    An item not inserted shares the id of the row stored under its delivery key, or else of
    the row stored under its semantic key (a replay under a new delivery id).
    """
    by_key = {(provider, key): row_id for row_id, provider, key, _ in stored}
    by_semantic = {(provider, sem): row_id for row_id, provider, _, sem in stored if sem}
    out: Stored = []
    for item in items:
        d = item.delivery
        row_id = inserted.get((d.provider, d.key))
        if row_id is not None:
            out.append((row_id, True))
            continue
        found = by_key.get((d.provider, d.key))
        if found is None and d.semantic_key:
            found = by_semantic.get((d.provider, d.semantic_key))
        out.append((found or 0, False))
    return out


class PostgresWriter:
    """Holds one connection for the intake's commits: one batch at a time (DeliveryStore keeps
    one writer per commit slot)."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            conn = await self._connect()
            try:
                await conn.set_autocommit(True)
                await conn.execute("SET synchronous_commit = on")
                if conn.info.encoding == "utf-8":  # what TextArrayDumper encodes to
                    conn.adapters.register_dumper(TextArray, TextArrayDumper)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def write(self, items: Sequence[_Pending]) -> Stored:
        if not items:
            return []
        try:
            try:
                return await self._write(items)
            except psycopg.errors.DeadlockDetected:
                # Two batches in flight met the same keys in opposite orders (possible only
                # through semantic keys: delivery keys go in sorted); the server rolled this
                # one back, and the other has committed by now.
                log.info("intake batch of %d hit a deadlock; retrying it once", len(items))
                return await self._write(items)
        except BaseException:
            # a failed or timed-out statement may leave the connection mid-protocol: start over
            await self.close()
            raise

    async def _write(self, items: Sequence[_Pending]) -> Stored:
        conn = await self._connection()
        # one order for every batch, so two in flight take their key locks in the same order
        ordered = sorted(items, key=lambda i: (i.delivery.provider, i.delivery.key))
        columns = batch_columns(ordered)
        try:
            cur = await conn.execute(INSERT_NEW, columns, prepare=True)
        except psycopg.errors.UniqueViolation:
            # a key stored before, or by a batch committed meanwhile: this statement stored
            # nothing, so the batch goes again, with the copies left out by the server
            cur = await conn.execute(INSERT_BATCH, columns, prepare=True)
        inserted = {(provider, key): row_id for row_id, provider, key in await cur.fetchall()}
        stored: list[tuple[int, str, str, str | None]] = []
        if len(inserted) < len(items):
            # Some keys were stored before (or by another process meanwhile): their ids. The
            # INSERT waited for any concurrent writer of the same key to commit, so those rows
            # are visible to this next statement.
            left = [
                i.delivery for i in items if (i.delivery.provider, i.delivery.key) not in inserted
            ]
            keys = TextArray(d.key for d in left)
            semantic = TextArray(d.semantic_key for d in left if d.semantic_key)
            cur = await conn.execute(FIND_STORED, (keys, semantic), prepare=True)
            stored = [(int(r[0]), r[1], r[2], r[3]) for r in await cur.fetchall()]
        return resolve(items, inserted, stored)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            try:
                await conn.close()
            except Exception:  # already broken: nothing to tell it
                pass
