"""Alembic environment: runs migrations on the connection the caller hands in."""

from alembic import context
from sqlalchemy import create_engine

from pki.store import enrollment_models as enrollment_models
from pki.store import job_lock as job_lock
from pki.store import refusals as refusals
from pki.store import revocation_models as revocation_models
from pki.store.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run()
