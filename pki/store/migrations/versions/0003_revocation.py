"""revocation: stored CRLs, revocation events, pre-signed OCSP responses, admin tokens

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "crls",
        sa.Column("id", _ID, nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("is_delta", sa.Boolean(), nullable=False),
        sa.Column("base_number", sa.BigInteger(), nullable=True),
        sa.Column("this_update", sa.DateTime(), nullable=False),
        sa.Column("next_update", sa.DateTime(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("crl_der", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["issuer_id"], ["issuers.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("issuer_id", "crl_number", name="uq_crls_issuer_number"),
    )
    op.create_index(
        "ix_crls_issuer_delta", "crls", ["issuer_id", "is_delta", "crl_number"], unique=False
    )
    op.create_table(
        "revocation_events",
        sa.Column("id", _ID, nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("certificate_id", _ID, nullable=False),
        sa.Column("serial_hex", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["issuer_id"], ["issuers.id"]),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_revocation_events_issuer_at", "revocation_events", ["issuer_id", "at"], unique=False
    )
    op.create_table(
        "ocsp_responses",
        sa.Column("certificate_id", _ID, nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("serial_hex", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("this_update", sa.DateTime(), nullable=False),
        sa.Column("next_update", sa.DateTime(), nullable=False),
        sa.Column("signer_serial_hex", sa.String(length=40), nullable=False),
        sa.Column("response_der", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"]),
        sa.ForeignKeyConstraint(["issuer_id"], ["issuers.id"]),
        sa.PrimaryKeyConstraint("certificate_id"),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", _ID, nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("disabled_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )


def downgrade() -> None:
    op.drop_table("admin_tokens")
    op.drop_table("ocsp_responses")
    op.drop_index("ix_revocation_events_issuer_at", table_name="revocation_events")
    op.drop_table("revocation_events")
    op.drop_index("ix_crls_issuer_delta", table_name="crls")
    op.drop_table("crls")
