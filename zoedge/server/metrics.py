"""Prometheus metrics: fleet counts read from the database at scrape time, upload counters per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from zoedge.server.models import PATCH_KINDS, Bundle, Device, Patch


class FleetCollector:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as db:
            devices = db.scalar(select(func.count()).select_from(Device)) or 0
            bundles = db.scalar(select(func.count()).select_from(Bundle)) or 0
            rows = db.execute(select(Patch.kind, func.count(), func.coalesce(func.sum(Patch.bytes), 0))
                              .group_by(Patch.kind)).all()
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


class Metrics:
    def __init__(self, sessions: sessionmaker[Session]):
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(sessions))
        self.uploads = Counter("zoedge_uploads", "Patch uploads received by this worker, by result",
                               ["result"], registry=self.registry)
        self.upload_bytes = Counter("zoedge_upload_bytes", "Patch upload bytes received by this worker",
                                    registry=self.registry)
        for result in ("created", "duplicate", "rejected", "too_large"):
            self.uploads.labels(result)
