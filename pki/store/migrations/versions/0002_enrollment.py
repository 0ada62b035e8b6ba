"""enrollment: one-time secrets, login failures, pending approvals

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "enrollment_secrets",
        sa.Column("id", _ID, nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("secret_hash", sa.String(length=256), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "active", "used", "replaced", name="secret_state", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.create_index(
            "ix_enrollment_secrets_device_state", ["device_id", "state"], unique=False
        )

    op.create_table(
        "auth_failures",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id"),
    )

    op.create_table(
        "pending_approvals",
        sa.Column("id", _ID, nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("csr_sha256", sa.String(length=64), nullable=False),
        sa.Column("csr_der", sa.LargeBinary(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending", "approved", "issued", name="approval_state", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("pending_approvals", schema=None) as batch_op:
        batch_op.create_index(
            "ix_pending_approvals_device_state", ["device_id", "state"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("pending_approvals", schema=None) as batch_op:
        batch_op.drop_index("ix_pending_approvals_device_state")
    op.drop_table("pending_approvals")
    op.drop_table("auth_failures")
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.drop_index("ix_enrollment_secrets_device_state")
    op.drop_table("enrollment_secrets")
