"""Operations: health (under /v1), Prometheus metrics and the HTML dashboard (at the root)."""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from zoedge.server import dashboard
from zoedge.server.deps import SessionDep, StateDep, bearer, get_caller
from zoedge.server.schemas import Health

router = APIRouter(tags=["ops"])  # mounted under /v1
root_router = APIRouter(tags=["ops"])  # mounted at /


@router.get("/health", response_model=Health)
def health(db: SessionDep) -> Health:
    try:
        db.execute(text("SELECT 1"))
    except Exception as e:  # report, don't crash: a load balancer reads this
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {type(e).__name__}") from None
    return Health(status="ok", database=db.get_bind().dialect.name)


@root_router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text format: devices, bundles, patches and stored bytes (from the database), uploads and
    upload bytes received by this worker."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def dashboard_access(state: StateDep, db: SessionDep,
                     creds: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]) -> None:
    """Public unless settings.public_dashboard is off; then the admin token is needed."""
    if state.settings.public_dashboard:
        return
    if not get_caller(state, db, creds).admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the dashboard needs the admin token")


@root_router.get("/", response_class=HTMLResponse, dependencies=[Depends(dashboard_access)])
def dashboard_page(db: SessionDep) -> HTMLResponse:
    return HTMLResponse(dashboard.render(db))
