"""refusals: refused requests counted per key and minute before they reach the audit log

Revision ID: 0006_refusals
Revises: 0005_audit_checkpoints
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_refusals"
down_revision = "0005_audit_checkpoints"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusal_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("minute", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("refusal_counts", schema=None) as batch_op:
        batch_op.create_index(
            "uq_refusal_counts_key", ["minute", "kind", "source", "subject"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("refusal_counts", schema=None) as batch_op:
        batch_op.drop_index("uq_refusal_counts_key")
    op.drop_table("refusal_counts")
