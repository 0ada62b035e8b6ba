"""crl marker: a per-issuer revocation counter, recorded on each revocation event and CRL

Revision ID: 0008_crl_marker
Revises: 0007_device_binding

Every transaction that changes a certificate's revocation state advances its issuer's
`revocation_marker` and writes the new value on its events; a CRL records the marker it read
before its entries. Events from before this migration get marker 0 and CRLs none, so the
first publication after the upgrade is due at once and establishes a marker.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_crl_marker"
down_revision = "0007_device_binding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issuers") as batch:
        batch.add_column(
            sa.Column("revocation_marker", sa.BigInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("revocation_events") as batch:
        batch.add_column(sa.Column("marker", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index(
        "ix_revocation_events_issuer_marker", "revocation_events", ["issuer_id", "marker"]
    )
    with op.batch_alter_table("crls") as batch:
        batch.add_column(sa.Column("marker", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("crls") as batch:
        batch.drop_column("marker")
    op.drop_index("ix_revocation_events_issuer_marker", table_name="revocation_events")
    with op.batch_alter_table("revocation_events") as batch:
        batch.drop_column("marker")
    with op.batch_alter_table("issuers") as batch:
        batch.drop_column("revocation_marker")
