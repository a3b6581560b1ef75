"""`create_app(settings)`: the FastAPI application. Routes live under /v1, the OpenAPI schema at /openapi.json
(interactive, offline: /docs and /redoc), the dashboard at / and Prometheus metrics at /metrics.

Several workers: `uvicorn --factory zoedge.server.app:app_from_env --workers 4` with ZOEDGE_* variables
(see docs/server.md); the rate limit and upload counters are in the database, blobs in the store
(ZOEDGE_BLOB_STORE), so workers and hosts share them."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.responses import JSONResponse

import zoedge
from zoedge.errors import ZoedgeError
from zoedge.server import apidocs
from zoedge.server.blobs import make_store
from zoedge.server import schema
from zoedge.server.db import make_engine, make_sessions
from zoedge.server.metrics import Metrics
from zoedge.server.ratelimit import RateLimiter
from zoedge.server.routes import bundles, devices, ops, patches
from zoedge.server.settings import Settings
from zoedge.server.state import ServerState

API_PREFIX = "/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings)
    schema.upgrade(engine)  # Alembic migrations to the newest revision
    sessions = make_sessions(engine)
    state = ServerState(settings=settings, engine=engine, sessions=sessions,
                        blobs=make_store(settings), metrics=Metrics(engine, sessions),
                        limiter=RateLimiter(engine, settings.rate_limit_per_minute))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.dispose()

    app = FastAPI(title="zoedge fleet server", version=zoedge.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Devices upload zeroth-order fine-tuning patches; the admin publishes bundles "
                              "and averages patches into global versions.")
    apidocs.install(app)  # /docs and /redoc from packaged assets, no CDN
    app.state.zoedge = state
    api = APIRouter(prefix=API_PREFIX)
    for module in (devices, bundles, patches, ops):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(ops.root_router)

    @app.exception_handler(ZoedgeError)
    async def bad_content(_request: Request, exc: ZoedgeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory`: settings from ZOEDGE_* environment variables."""
    return create_app(Settings())
