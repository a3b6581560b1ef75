"""Prometheus metrics, all read from the database at scrape time, so every worker answers the same: fleet counts
and the upload counters (table counters, incremented atomically by whichever worker took the upload)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from zoedge.server.db import dialect_insert
from zoedge.server.models import PATCH_KINDS, Bundle, Counter, Device, Patch

UPLOAD_RESULTS = ("created", "duplicate", "rejected", "too_large", "rate_limited")
UPLOADS, UPLOAD_BYTES = "uploads:", "upload_bytes"


class FleetCollector:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as db:
            devices = db.scalar(select(func.count()).select_from(Device)) or 0
            bundles = db.scalar(select(func.count()).select_from(Bundle)) or 0
            rows = db.execute(select(Patch.kind, func.count(), func.coalesce(func.sum(Patch.bytes), 0))
                              .group_by(Patch.kind)).all()
            counters = dict(db.execute(select(Counter.name, Counter.value)).all())
        yield GaugeMetricFamily("zoedge_devices", "Registered devices", value=devices)
        yield GaugeMetricFamily("zoedge_bundles", "Published bundles", value=bundles)
        by_kind = {kind: (n, b) for kind, n, b in rows}
        patches = GaugeMetricFamily("zoedge_patches", "Stored patches by kind", labels=["kind"])
        stored = GaugeMetricFamily("zoedge_patch_bytes", "Bytes of stored patch archives by kind", labels=["kind"])
        for kind in PATCH_KINDS:
            n, b = by_kind.get(kind, (0, 0))
            patches.add_metric([kind], n)
            stored.add_metric([kind], int(b))
        yield patches
        yield stored
        uploads = CounterMetricFamily("zoedge_uploads", "Patch uploads received (all workers), by result",
                                      labels=["result"])
        for result in UPLOAD_RESULTS:
            uploads.add_metric([result], counters.get(UPLOADS + result, 0))
        yield uploads
        yield CounterMetricFamily("zoedge_upload_bytes", "Patch upload bytes received (all workers)",
                                  value=counters.get(UPLOAD_BYTES, 0))


class Metrics:
    def __init__(self, engine: Engine, sessions: sessionmaker[Session]):
        self.engine = engine
        self.insert = dialect_insert(engine)
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(sessions))

    def count_upload(self, result: str, nbytes: int = 0) -> None:
        """One upload with this result (and its body bytes), in one atomic statement."""
        assert result in UPLOAD_RESULTS, result
        rows = [{"name": UPLOAD_BYTES, "value": nbytes}] if nbytes else []
        rows.append({"name": UPLOADS + result, "value": 1})  # sorted by name: workers lock rows in one order
        ins = self.insert(Counter).values(rows)
        with self.engine.begin() as conn:
            conn.execute(ins.on_conflict_do_update(index_elements=[Counter.name],
                                                   set_={"value": Counter.value + ins.excluded.value}))
