"""single head: joins the enrollment (0002) and revocation (0003) branches

Revision ID: 0004
Revises: 0002, 0003

Later migrations chain from here, so `alembic heads` names one revision and a new
migration always knows its parent.
"""

revision = "0004"
down_revision = ("0002", "0003")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
