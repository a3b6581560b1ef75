"""Engine and sessions: SQLite (a file in the data dir, WAL mode) by default, PostgreSQL by URL."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from zoedge.server.settings import Settings


def make_engine(settings: Settings) -> Engine:
    url = settings.db_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=20)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; safe with several workers
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def dialect_insert(engine: Engine):
    """The dialect's insert(), whose on_conflict_do_update makes an atomic upsert (shared counters)."""
    try:
        return INSERTS[engine.dialect.name]
    except KeyError:
        raise RuntimeError(f"no atomic upsert for database {engine.dialect.name!r} (SQLite or PostgreSQL)") from None
