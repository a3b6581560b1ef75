"""The rate limiter and upload counters live in the database (issue 16), so every worker shares them: their
semantics with a fake clock, and atomicity under concurrency (threads on separate engines, as separate worker
processes would use) on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from sqlalchemy import create_engine, select

from zoedge.server import schema
from zoedge.server.db import make_engine
from zoedge.server.metrics import Metrics
from zoedge.server.models import Counter
from zoedge.server.ratelimit import RateLimiter
from zoedge.server.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path) -> Settings:
    if request.param == "postgresql":
        url = os.environ.get("ZOEDGE_TEST_PG_URL")
        if not url:
            pytest.skip("ZOEDGE_TEST_PG_URL is not set: the PostgreSQL run is in `make test-server`")
        s = Settings(data_dir=tmp_path, database_url=url)
    else:
        s = Settings(data_dir=tmp_path)  # the server's own SQLite setup (WAL, busy timeout)
    e = make_engine(s)
    schema.upgrade(e)  # idempotent; the keys below are fresh, so a shared PostgreSQL needs no reset
    e.dispose()
    return s


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_limit_window_slides_and_refusals_are_not_counted(settings):
    engine = make_engine(settings)
    clock = Clock(600.0 * 1_000_000)  # a window start
    lim = RateLimiter(engine, 3, clock=clock)
    key, other = uuid.uuid4().hex, uuid.uuid4().hex
    assert [lim.retry_after(key) for _ in range(3)] == [0.0] * 3
    wait = lim.retry_after(key)
    assert 60.0 < wait <= 100.0  # the full window, then until the 3 hits weigh <= 2: 60 + 60/3 s
    assert lim.retry_after(other) == 0.0  # per key
    clock.t += 59.0
    assert lim.retry_after(key) > 0  # still the same window; the refusals above did not add hits
    clock.t += 1.0 + 19.0  # 19 s into the next window: 3 * 41/60 = 2.05 of the old hits still inside
    assert lim.retry_after(key) > 0
    clock.t += 2.0  # 21 s in: 3 * 39/60 = 1.95 -> room for one
    assert lim.retry_after(key) == 0.0
    assert lim.retry_after(key) > 0
    clock.t += 60.0 + 40.0  # two windows later the old hits are gone
    assert [lim.retry_after(key) for _ in range(3)] == [0.0] * 3
    assert lim.retry_after(key) > 0
    assert RateLimiter(engine, 0).retry_after(key) == 0.0  # 0 = off
    engine.dispose()


def test_limit_holds_across_workers_under_concurrency(settings):
    """8 threads on 4 engines fire 240 calls for one key at one instant: exactly the limit is admitted."""
    key, limit = uuid.uuid4().hex, 50
    engines = [make_engine(settings) for _ in range(4)]
    clock = Clock(600.0 * 2_000_000 + 1.0)
    limiters = [RateLimiter(e, limit, clock=clock) for e in engines]
    admitted = hammer(lambda i: limiters[i % 4].retry_after(key) == 0.0, threads=8, calls=30)
    assert sum(admitted) == limit
    for e in engines:
        e.dispose()


def test_upload_counters_are_exact_under_concurrency(settings):
    engines = [make_engine(settings) for _ in range(4)]
    metrics = [Metrics(e, None) for e in engines]
    before = counters(engines[0])

    def upload(i: int) -> None:
        metrics[i % 4].count_upload("created", 10)
        metrics[i % 4].count_upload("rate_limited")

    hammer(upload, threads=8, calls=25)
    after = counters(engines[0])
    assert after.get("uploads:created", 0) - before.get("uploads:created", 0) == 200
    assert after.get("uploads:rate_limited", 0) - before.get("uploads:rate_limited", 0) == 200
    assert after.get("upload_bytes", 0) - before.get("upload_bytes", 0) == 2000
    for e in engines:
        e.dispose()


def hammer(fn, threads: int, calls: int) -> list:
    """fn(thread index) `calls` times on each of `threads` threads, all released at once; the results."""
    results, errors = [], []
    barrier = threading.Barrier(threads)

    def run(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(calls):
                results.append(fn(i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors, errors[:3]
    return results


def counters(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Counter.name, Counter.value)).all())
