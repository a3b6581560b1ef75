"""Fixtures for the fleet server tests: a real uvicorn on a free loopback port, in a thread.

Import what a test module uses: `from server_conftest import fleet, backend  # noqa: F401`.
The session-scoped `fleet` runs once on SQLite and once on PostgreSQL when ZOEDGE_TEST_PG_URL is set
(a disposable database: its zoedge tables are dropped first; scripts/ci_postgres.sh starts one).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text

from zoedge.device.client import FleetClient
from zoedge.server.app import create_app
from zoedge.server.models import Base
from zoedge.server.settings import Settings

ADMIN = "test-admin-token"
PG_ENV = "ZOEDGE_TEST_PG_URL"
TEST_UPLOAD_LIMIT = 1 << 20  # 1 MiB: tiny-bert patches are ~20 KB; the 413 test sends more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(settings) on 127.0.0.1:port in a daemon thread."""

    def __init__(self, settings: Settings, port: int | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def state(self):
        return self.app.state.zoedge

    def start(self, timeout: float = 20.0) -> "LiveServer":
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(15)
            assert not self.thread.is_alive(), "uvicorn did not stop"


def reset_postgres(url: str) -> None:
    engine = create_engine(Settings(database_url=url).db_url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:  # the migrations' bookkeeping too, or the next server thinks it is at head
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


def make_settings(data_dir: Path, backend: str, **overrides) -> Settings:
    kw = dict(data_dir=data_dir, admin_token=ADMIN, max_upload_bytes=TEST_UPLOAD_LIMIT, rate_limit_per_minute=0,
              database_url=os.environ[PG_ENV] if backend == "postgresql" else "")
    kw.update(overrides)
    return Settings(**kw)


@dataclass
class Fleet:
    live: LiveServer
    bundle_dir: Path
    bundle_id: str
    admin_token: str = ADMIN

    @property
    def url(self) -> str:
        return self.live.url

    def client(self, token: str | None, **kw) -> FleetClient:
        kw.setdefault("retries", 2)
        kw.setdefault("backoff", 0.05)
        return FleetClient(self.url, token, **kw)

    def admin(self) -> FleetClient:
        return self.client(self.admin_token)

    def device(self, name: str = "dev") -> tuple[str, str]:
        with self.admin() as c:
            r = c.register_device(name)
        return r["device_id"], r["token"]

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"} if token else {},
                            timeout=60)

    def stored_state(self) -> tuple[int, list[str]]:
        """(patch rows, blob files): what a rejected upload must not change."""
        from sqlalchemy import func, select

        from zoedge.server.models import Patch

        with self.live.state.sessions() as db:
            n = db.scalar(select(func.count()).select_from(Patch))
        root = self.live.state.blobs.root
        blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return n, blobs


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request) -> str:
    if request.param == "postgresql" and not os.environ.get(PG_ENV):
        pytest.skip(f"{PG_ENV} is not set: the PostgreSQL run of the server suite is skipped "
                    "(scripts/ci_postgres.sh starts a local cluster and prints the URL)")
    return request.param


@pytest.fixture(scope="session")
def fleet(backend, tiny_bert_bundle, tmp_path_factory):
    if backend == "postgresql":
        reset_postgres(os.environ[PG_ENV])
    live = LiveServer(make_settings(tmp_path_factory.mktemp(f"server-{backend}"), backend)).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            bundle = admin.publish_bundle(tiny_bert_bundle)
        yield Fleet(live, tiny_bert_bundle, bundle["bundle_id"])
    finally:
        live.stop()


__all__ = ["backend", "fleet", "Fleet", "LiveServer", "make_settings", "free_port", "reset_postgres", "ADMIN",
           "PG_ENV", "TEST_UPLOAD_LIMIT"]
