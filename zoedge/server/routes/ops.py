"""Operations: health (under /v1), Prometheus metrics and the HTML dashboard (at the root)."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Callable

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from zoedge.server import dashboard
from zoedge.server.deps import SessionDep, StateDep
from zoedge.server.schemas import Health
from zoedge.server.settings import Settings

router = APIRouter(tags=["ops"])  # mounted under /v1
root_router = APIRouter(tags=["ops"])  # mounted at /


@router.get("/health", response_model=Health)
def health(db: SessionDep) -> Health:
    try:
        db.execute(text("SELECT 1"))
    except Exception as e:  # report, don't crash: a load balancer reads this
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database unavailable: {type(e).__name__}") from None
    return Health(status="ok", database=db.get_bind().dialect.name)


def _token(request: Request) -> str:
    """The bearer token, or the password of HTTP Basic auth (what a browser prompts for: any user name)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def _same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def read_access(public: Callable[[Settings], bool], challenge: str):
    """A dependency: the route is open when `public(settings)`, else it needs the admin token or the read token."""

    def check(state: StateDep, request: Request) -> None:
        settings = state.settings
        if public(settings):
            return
        token = _token(request)
        if _same(token, settings.admin_token) or _same(token, settings.read_token):
            return
        msg = ("needs the admin token or the read-only token (ZOEDGE_READ_TOKEN)" if token
               else "needs a token: the admin token or the read-only token (ZOEDGE_READ_TOKEN)")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"{request.url.path} {msg}",
                            headers={"WWW-Authenticate": challenge})

    return check


dashboard_access = read_access(lambda s: s.public_dashboard, 'Basic realm="zoedge dashboard", charset="UTF-8"')
metrics_access = read_access(lambda s: s.public_metrics, "Bearer")


@root_router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)])
def metrics(state: StateDep) -> Response:
    """Prometheus text format: devices, bundles, patches and stored bytes (from the database), uploads and
    upload bytes received by this worker. Needs the admin or read-only token unless ZOEDGE_PUBLIC_METRICS."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@root_router.get("/", response_class=HTMLResponse, dependencies=[Depends(dashboard_access)])
def dashboard_page(db: SessionDep) -> HTMLResponse:
    """The HTML dashboard. Needs the admin or read-only token (bearer, or as the password of HTTP Basic auth,
    which a browser asks for) unless ZOEDGE_PUBLIC_DASHBOARD."""
    return HTMLResponse(dashboard.render(db))
