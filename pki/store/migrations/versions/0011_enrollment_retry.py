"""enrollment retry: the certificate a spent one-time secret bought

Revision ID: 0011_enrollment_retry
Revises: 0010_secret_labels

A request that was issued but whose answer never reached the device is retried with the
same secret; the link lets the retry get the same certificate again. Certificate rows may
now also be `abandoned` (a pending row never released); the status column is a plain
string, so that needs no schema change.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_enrollment_retry"
down_revision = "0010_secret_labels"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("certificate_id", _ID, nullable=True))
        batch_op.create_foreign_key(
            "fk_enrollment_secrets_certificate", "certificates", ["certificate_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.drop_constraint("fk_enrollment_secrets_certificate", type_="foreignkey")
        batch_op.drop_column("certificate_id")
