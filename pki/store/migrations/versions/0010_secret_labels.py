"""secret labels: the EST labels a one-time secret is valid on

Revision ID: 0010_secret_labels
Revises: 0009_job_locks

NULL (secrets drawn before this revision) means the default label only.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_secret_labels"
down_revision = "0009_job_locks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.drop_column("labels")
