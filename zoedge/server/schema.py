"""The database schema is what the Alembic migrations in zoedge/server/migrations build: `upgrade` brings any
database to the newest revision when the server starts. A database made before migrations existed (tables, no
`alembic_version`) is stamped at revision 0001, which is that schema, and then upgraded."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

PG_SCHEMA_LOCK = 0x7A0E  # advisory lock so several workers starting at once migrate once
MIGRATIONS = Path(__file__).with_name("migrations")
FIRST = "0001"


def _config(connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_SCHEMA_LOCK})
        cfg = _config(conn)
        if MigrationContext.configure(conn).get_current_revision() is None and inspect(conn).has_table("patches"):
            command.stamp(cfg, FIRST)  # made by create_all before migrations: that is revision 0001
        command.upgrade(cfg, "head")
