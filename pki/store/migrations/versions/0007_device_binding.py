"""device bindings and login throttling per (device, address)

Revision ID: 0007_device_binding
Revises: 0006_refusals

`device_bindings` records how each device may enroll (one-time secret, or one
manufacturer's IDevID, bound on first use). Devices that were ever given a secret are bound
to secrets; the others are bound by their next enrollment. `auth_failures` (one counter per
device, which let anyone lock a device out) gives way to `login_failures`, counted per
source address and per (device ID, source address); the old counters are transient.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_device_binding"
down_revision = "0006_refusals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_bindings",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column(
            "method",
            sa.Enum("secret", "idevid", name="enroll_method", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("manufacturer_sha256", sa.String(length=64), nullable=True),
        sa.Column("idevid_sha256", sa.String(length=64), nullable=True),
        sa.Column("idevid_issuer", sa.String(length=512), nullable=True),
        sa.Column("idevid_serial", sa.String(length=64), nullable=True),
        sa.Column("bound_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id"),
        sa.UniqueConstraint("idevid_sha256"),
    )
    op.execute(
        "INSERT INTO device_bindings (device_id, method) "
        "SELECT DISTINCT device_id, 'secret' FROM enrollment_secrets"
    )
    op.drop_table("auth_failures")
    op.create_table(
        "login_failures",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "address"),
    )


def downgrade() -> None:
    op.drop_table("login_failures")
    op.create_table(
        "auth_failures",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.drop_table("device_bindings")
