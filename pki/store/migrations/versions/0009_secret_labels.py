"""secret labels: the EST labels a one-time secret is valid on

Revision ID: 0009_secret_labels
Revises: 0008_crl_marker

NULL (secrets drawn before this revision) means the default label only.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_secret_labels"
down_revision = "0008_crl_marker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.drop_column("labels")
