"""Automatic aggregation (ZOEDGE_AUTO_AGGREGATE=N): once N devices have uploaded a patch of a bundle in the current
round (device patches of the bundle or its siblings whose `version` is the group's latest global version), their
latest patches are averaged into the next global version, as `POST /v1/bundles/{id}/aggregate` would. A fleet of
agents then improves one shared global patch without an operator. A refused aggregate (an outlier patch) is logged
and left to the admin."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import HTTPException
from sqlalchemy import select

from zoedge.errors import ZoedgeError
from zoedge.server.aggregate import aggregate
from zoedge.server.intake import latest_global_version
from zoedge.server.models import Patch
from zoedge.server.siblings import group_ids
from zoedge.server.state import ServerState

log = logging.getLogger("zoedge.server")


def round_patches(state: ServerState, bundle_id: str) -> list[str]:
    """The latest patch id of each device that uploaded in the bundle's current round, oldest device first."""
    with state.sessions() as db:
        version = latest_global_version(db, bundle_id)
        rows = db.scalars(select(Patch).where(Patch.bundle_id.in_(group_ids(db, bundle_id)),
                                              Patch.kind != "global", Patch.version == version)
                          .order_by(Patch.created, Patch.id))
        latest: dict[str, str] = {}
        for p in rows:
            latest.pop(p.device_id, None)
            latest[p.device_id] = p.id
        return list(latest.values())


def maybe_aggregate(state: ServerState, bundle_id: str) -> Optional[Patch]:
    n = state.settings.auto_aggregate
    if n <= 0:
        return None
    ids = round_patches(state, bundle_id)
    if len(ids) < n:
        return None
    try:
        return aggregate(state, bundle_id, ids)
    except (HTTPException, ZoedgeError) as e:  # a concurrent aggregate (409) or an outlier: not the upload's fault
        log.warning("auto-aggregate of bundle %s skipped: %s", bundle_id, getattr(e, "detail", e))
        return None
