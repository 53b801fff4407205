"""deliveries: semantic key (replay-safe intake) and claim leases

Revision ID: 0006_faults
Revises: 0001
Create Date: 2026-11-30 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_faults"
down_revision = "0005_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs and a CREATE INDEX: no table rebuild on SQLite, no rewrite on Postgres
    op.add_column("webhook_deliveries", sa.Column("semantic_key", sa.String(length=255), nullable=True))
    op.add_column("webhook_deliveries", sa.Column("claimed_by", sa.String(length=255), nullable=True))
    op.add_column("webhook_deliveries", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "uq_deliveries_provider_semantic", "webhook_deliveries", ["provider", "semantic_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_deliveries_provider_semantic", table_name="webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.drop_column("lease_until")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("semantic_key")
