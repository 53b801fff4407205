"""JSON as the project writes and reads it: msgspec, with the standard library behind it.

Used for the database's JSON columns (bot/storage/db.py) and for a webhook's payload
(bot/handlers/sansio.py).

A step loads its run several times (`load_run`: the run, its project and every step in one
query), and the driver decodes each JSON column of each row, so the standard library's decoder
was the largest single item of a worker's CPU per step (bench/scale.py under cProfile). msgspec
does the same work about three times faster and, unlike orjson (which turns an integer beyond
64 bits into a float), reads every integer back exactly. What msgspec refuses, the standard
library still does as before: strings holding lone surrogates, keys that are booleans, and the
`NaN` that json.dumps used to write into SQLite.

Differences from `json.dumps` visible in the stored text: no spaces after separators, non-ASCII
written as UTF-8 rather than `\\uXXXX` escapes, NaN and infinities stored as `null` (Postgres's
json type refused the old `NaN` anyway). Values read back are equal either way.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def dumps(value: Any) -> bytes:
    """JSON bytes, for drivers that take bytes (psycopg)."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError):  # a lone surrogate (UnicodeEncodeError), a bool key
        return json.dumps(value).encode()


def dumps_text(value: Any) -> str:
    """JSON text for a column, for drivers that store what they are given as is (SQLite: bytes
    would become a BLOB)."""
    return dumps(value).decode()


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """A value from its JSON text (ValueError when it is not JSON)."""
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError:  # NaN and the like, which json.dumps wrote and json reads
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
