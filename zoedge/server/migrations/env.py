"""Alembic environment: runs on the connection `zoedge.server.schema.upgrade` hands it (no alembic.ini).

Alembic executes this file to migrate; importing it anywhere else only defines `run_migrations`."""

from __future__ import annotations

from alembic import context

from zoedge.server.models import Base


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if hasattr(context, "config"):  # only while Alembic runs this file (outside it the proxy has no config)
    run_migrations(context.config.attributes["connection"])
