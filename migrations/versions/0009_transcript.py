"""transcript chunks; money spent per step and protocol

Revision ID: 0009_transcript
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_transcript"
down_revision = "0006_faults"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transcript_chunks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("protocol_run_id", sa.Integer(), nullable=False),
        sa.Column("step_run_id", sa.Integer(), nullable=True),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("transcript_chunks", schema=None) as batch_op:
        batch_op.create_index("ix_transcript_step_id", ["step_run_id", "id"], unique=False)
        batch_op.create_index("ix_transcript_protocol_id", ["protocol_run_id", "id"], unique=False)
    for table in ("protocol_runs", "step_runs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0")
            )


def downgrade() -> None:
    for table in ("step_runs", "protocol_runs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("cost_usd")
    with op.batch_alter_table("transcript_chunks", schema=None) as batch_op:
        batch_op.drop_index("ix_transcript_protocol_id")
        batch_op.drop_index("ix_transcript_step_id")
    op.drop_table("transcript_chunks")
