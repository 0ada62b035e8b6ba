"""issuer retirement: when an issuer stopped issuing

Revision ID: 0012_issuer_retired
Revises: 0011_enrollment_retry

NULL: the issuer issues. A retired issuer signs nothing more, while its CRLs and OCSP answers
keep being served for what it issued (intermediate rollover, docs/ceremony.md).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_issuer_retired"
down_revision = "0011_enrollment_retry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issuers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retired_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issuers", schema=None) as batch_op:
        batch_op.drop_column("retired_at")
