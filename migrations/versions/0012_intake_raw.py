"""the raw delivery body on Postgres: compressed with lz4 instead of pglz

Revision ID: 0012_intake_raw
Revises: 0009_transcript

A ~4 KB body is compressed as it is stored (TOAST). pglz cost the server about 20 µs of CPU
per delivery more than lz4 for the same stored size (bench/intake.py, issue 19). Rows stored
before keep pglz; both read back alike. A server built without lz4 keeps pglz. SQLite: nothing.
"""

from __future__ import annotations

from alembic import op

revision = "0012_intake_raw"
down_revision = "0009_transcript"
branch_labels = None
depends_on = None


def _compression(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # EXECUTE inside the block, so "lz4 not supported" is an error the block can catch
    op.execute(
        "DO $$ BEGIN "
        f"EXECUTE 'ALTER TABLE webhook_deliveries ALTER COLUMN payload SET COMPRESSION {method}'; "
        "EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN "
        f"RAISE NOTICE 'payload compression stays as it was: {method} is not available'; "
        "END $$"
    )


def upgrade() -> None:
    _compression("lz4")


def downgrade() -> None:
    _compression("pglz")
