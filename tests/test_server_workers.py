"""Scale-out (issue 16): `uvicorn --factory zoedge.server.app:app_from_env --workers 4` on PostgreSQL, 200
concurrent uploads from 20 devices (10 each, archives of scripts/load_uploads.py) with a per-device limit of 5
a minute. Nothing is lost: every 201 is a row whose blobs are stored, and every other answer is a 429 with
Retry-After. The limit holds across the 4 workers together: each device gets exactly 5 uploads in (a limiter
per worker would let up to 4 x 5, here all 10, through), and /metrics, answered by whichever worker, counts
every worker's uploads. Runs in `make test-server` (needs ZOEDGE_TEST_PG_URL; its own throw-away database)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from conftest import REPO
from server_conftest import PG_ENV, free_port
from zoedge.device.client import FleetClient
from zoedge.server.blobs import LocalStore
from zoedge.server.models import Patch
from zoedge.server.settings import Settings

sys.path.insert(0, str(REPO / "scripts"))

WORKERS, DEVICES, PER_DEVICE, LIMIT = 4, 20, 10, 5
ADMIN = "workers-admin-token"


@pytest.fixture
def pg_database():
    """A fresh database on the test cluster, dropped afterwards (the session's `fleet` keeps its own)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: the 4-worker load test runs in `make test-server` (PostgreSQL)")
    name = f"zoedge_workers_{uuid.uuid4().hex[:8]}"
    admin = create_engine(Settings(database_url=base).db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Workers:
    """uvicorn with --workers N in a subprocess; its log in a file (the workers' pids are read from it)."""

    def __init__(self, env: dict[str, str], log: Path, workers: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.workers = workers
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "zoedge.server.app:app_from_env", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(workers), "--log-level", "info", "--no-access-log"]
        self.log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=REPO)

    def pids(self) -> set[str]:
        started = set(re.findall(r"Started server process \[(\d+)\]", self.log.read_text(errors="replace")))
        return started

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text_ = self.log.read_text(errors="replace")
            if text_.count("Application startup complete") >= self.workers:
                try:
                    if httpx.get(f"{self.url}/v1/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn --workers {self.workers} did not start:\n{text_[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


def metric_values(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.text.splitlines() if not line.startswith("#")}


def test_four_workers_on_postgresql_200_uploads_none_lost_limit_shared(pg_database, tiny_bert_bundle, tmp_path):
    from load_uploads import build_archives, fire

    data_dir = tmp_path / "data"
    env = {"ZOEDGE_DATABASE_URL": pg_database, "ZOEDGE_DATA_DIR": str(data_dir), "ZOEDGE_ADMIN_TOKEN": ADMIN,
           "ZOEDGE_RATE_LIMIT_PER_MINUTE": str(LIMIT), "ZOEDGE_MAX_UPLOAD_BYTES": str(1 << 20)}
    server = Workers(env, tmp_path / "uvicorn.log", WORKERS)  # starts while the archives are built
    try:
        archives = build_archives(tiny_bert_bundle, tmp_path / "archives", DEVICES * PER_DEVICE)
        server.wait_ready()
        assert len(server.pids()) == WORKERS, server.log.read_text()[-2000:]
        with FleetClient(server.url, ADMIN, retries=2, backoff=0.1) as admin:
            admin.publish_bundle(tiny_bert_bundle)
            devices = [admin.register_device(f"w-{i}") for i in range(DEVICES)]
        # a minute boundary inside the burst would start a new window; begin with >= 15 s of this one
        # left (a burst that ends < 12 s into the next window still admits exactly LIMIT: ratelimit.py's weights)
        if time.time() % 60 > 45:
            time.sleep(60 - time.time() % 60 + 0.5)
        owner = [devices[i % DEVICES] for i in range(len(archives))]
        jobs = [(owner[i]["token"], data, sha, fmt) for i, (data, sha, fmt) in enumerate(archives)]
        t0 = time.monotonic()
        results = asyncio.run(fire(server.url, jobs, timeout=300))
        seconds = time.monotonic() - t0
        counts = collections.Counter(code for code, _ in results)
        print(f"\n4 workers, PostgreSQL: {len(jobs)} concurrent uploads in {seconds:.1f} s: {dict(counts)}")

        accepted = collections.Counter()
        answered = {}
        for i, (code, body) in enumerate(results):
            if code == 201:
                assert body["sha256"] == archives[i][1] and body["device_id"] == owner[i]["device_id"], body
                accepted[owner[i]["device_id"]] += 1
                answered[body["patch_id"]] = archives[i][1]
            else:  # the only other answer: refused by the limit, and said when to come back
                assert code == 429, (code, body)
        assert counts[201] + counts[429] == len(jobs) == DEVICES * PER_DEVICE
        # the limit, across the 4 workers together: exactly LIMIT per device, not up to 4 x LIMIT
        assert sorted(accepted.values()) == [LIMIT] * DEVICES, accepted

        # 0 lost: every accepted upload is a row with its blobs stored; no row that was not answered 201
        engine = create_engine(Settings(database_url=pg_database).db_url)
        with engine.connect() as conn:
            rows = conn.execute(select(Patch.id, Patch.sha256, Patch.archive_sha256, Patch.adapter_blob)
                                .where(Patch.kind != "global")).all()
        engine.dispose()
        assert {r.id: r.sha256 for r in rows} == answered
        store = LocalStore(data_dir / "blobs")
        missing = [b for r in rows for b in (r.sha256, r.archive_sha256, r.adapter_blob) if not store.exists(b)]
        assert not missing, missing[:5]

        # refusals carry Retry-After; a device over its limit is still refused, whichever worker answers
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {devices[0]['token']}"}) as http:
            for _ in range(8):  # 8 fresh connections: spread over the workers
                r = http.post("/v1/patches", content=archives[0][0], headers={
                    "X-Zoedge-Sha256": archives[0][1], "Connection": "close"})
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, (r.status_code, r.text[:200])

        # the upload counters are the database's, the same from every worker
        for _ in range(4):
            m = metric_values(server.url)
            assert m['zoedge_uploads_total{result="created"}'] == DEVICES * LIMIT
            assert m['zoedge_uploads_total{result="rate_limited"}'] == DEVICES * (PER_DEVICE - LIMIT) + 8
            assert m["zoedge_upload_bytes_total"] == sum(len(d) for (d, _, _), (c, _) in zip(archives, results)
                                                         if c == 201)
    finally:
        server.stop()
