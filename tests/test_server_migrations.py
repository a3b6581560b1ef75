"""The server schema comes from Alembic migrations (issues 14, 16): an empty database is upgraded to the head
revision, and a database made by the previous schema (create_all, no alembic_version) is stamped and upgraded
with its rows kept. The ORM models and the migrations must describe the same schema."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from zoedge.server import schema
from zoedge.server.models import Base


def _reset(engine):
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "postgresql":
        url = os.environ.get("ZOEDGE_TEST_PG_URL")
        if not url:
            pytest.skip("ZOEDGE_TEST_PG_URL is not set: the PostgreSQL run is in `make test-server`")
        e = create_engine("postgresql+psycopg://" + url.split("://", 1)[1])
        _reset(e)
    else:
        e = create_engine(f"sqlite:///{tmp_path / 'z.db'}")
    yield e
    e.dispose()


def test_an_empty_database_is_upgraded_to_head(engine):
    schema.upgrade(engine)
    assert schema.current(engine) == schema.head()
    assert {"devices", "bundles", "patches", "rate_windows", "counters"} <= set(inspect(engine).get_table_names())
    schema.upgrade(engine)  # idempotent: a second worker starting finds it done
    assert schema.current(engine) == schema.head()


def _upgrade_to(engine, revision: str) -> None:
    """The schema as of `revision` (Alembic's own commands, on the migrations the server runs)."""
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(schema.MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_a_database_of_the_previous_schema_is_stamped_and_kept(engine):
    # how the server made its tables before migrations (zoedge 0.1: these three, as revision 0001 builds them;
    # later tables and columns come by migration), without alembic_version
    _upgrade_to(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO devices (id, name, token_hash, created) VALUES ('d1', 'pi', 'h', '2026-01-01')"))
    schema.upgrade(engine)
    assert schema.current(engine) == schema.head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM devices WHERE id = 'd1'")).scalar() == "pi"


def test_the_migrations_build_what_the_models_describe(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    schema.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff


def test_the_migration_modules_import_on_their_own():
    import subprocess
    import sys

    versions = sorted(p.stem for p in (Path(schema.MIGRATIONS) / "versions").glob("v*.py"))
    assert versions[:3] == ["v0001_initial", "v0002_shared_counters", "v0003_lineage"], versions
    for module in ["zoedge.server.migrations.env"] + [f"zoedge.server.migrations.versions.{v}" for v in versions]:
        p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert p.returncode == 0, (module, p.stderr[-1500:])


def test_the_revisions_form_one_line():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(schema.MIGRATIONS))
    assert len(script.get_heads()) == 1, script.get_heads()
    chain = [r.revision for r in script.walk_revisions()][::-1]
    assert chain[:3] == ["0001", "0002", "0003"], chain


def test_bundles_published_before_lineage_get_their_sibling_key(engine, tiny_bert_bundle):
    """Revision 0003 fills bundles.sibling_key from the stored manifests: one without lineage (older zoedge) derives
    it; one that no longer loads stays NULL (a group of its own)."""
    import json

    from zoedge.manifest import Manifest

    m = Manifest.load(tiny_bert_bundle)
    old = m.to_dict()
    del old["lineage"]
    _upgrade_to(engine, "0002")
    with engine.begin() as conn:
        for bid, manifest in (("old", old), ("new", m.to_dict()), ("broken", {"schema_version": 99})):
            conn.execute(text("INSERT INTO bundles (id, model_id, base_sha256, initial_sha256, manifest, sha256, bytes, "
                              "created) VALUES (:id, 'tiny-bert', :b, :i, :m, 'x', 1, '2026-01-01')"),
                         {"id": bid, "b": m.base_sha256, "i": m.initial_sha256, "m": json.dumps(manifest)})
    schema.upgrade(engine)
    with engine.connect() as conn:
        keys = dict(conn.execute(text("SELECT id, sibling_key FROM bundles")).all())
    assert keys == {"old": m.sibling_key, "new": m.sibling_key, "broken": None}
