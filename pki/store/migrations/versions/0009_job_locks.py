"""job locks: the lock rows that let one of several schedulers run a job on SQLite

Revision ID: 0009_job_locks
Revises: 0008_crl_marker

PostgreSQL schedulers use advisory locks instead; the table exists there too, unused, so the
schema is the same on both.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_job_locks"
down_revision = "0008_crl_marker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_locks",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("job_locks")
