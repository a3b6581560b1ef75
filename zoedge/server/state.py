"""Everything a request handler needs, built once per app by `create_app` and kept on app.state."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from zoedge.server.blobs import BlobStore
from zoedge.server.metrics import Metrics
from zoedge.server.models import Bundle
from zoedge.server.ratelimit import RateLimiter
from zoedge.server.settings import Settings
from zoedge.transfer import unpack


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    metrics: Metrics
    limiter: RateLimiter

    def bundle_dir(self, bundle: Bundle) -> Path:
        """The bundle unpacked under data_dir/bundles/<id> (from its archive blob on first use)."""
        target = self.settings.data_dir / "bundles" / bundle.id
        if (target / "manifest.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.blobs.temp_dir() as tmp:
            unpack(self.blobs.path(bundle.sha256), tmp / "b")
            try:
                os.rename(tmp / "b", target)
            except OSError:  # another request unpacked it first (or a stale empty dir is in the way)
                if not (target / "manifest.json").is_file():
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(tmp / "b", target)
        return target
