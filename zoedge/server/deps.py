"""Typed dependencies: the server state, a DB session, and who is calling (a device or the admin)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Iterator, Optional

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from zoedge.server.models import Device
from zoedge.server.state import ServerState

bearer = HTTPBearer(auto_error=False, description="A device token, or the admin token")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_state(request: Request) -> ServerState:
    return request.app.state.zoedge


StateDep = Annotated[ServerState, Depends(get_state)]


def get_db(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


@dataclass
class Caller:
    device: Optional[Device]  # None for the admin
    admin: bool

    def can_read(self, owner_device_id: Optional[str]) -> bool:
        """Devices read their own patches and global ones (owner None); the admin reads everything."""
        return self.admin or owner_device_id is None or (self.device is not None and self.device.id == owner_device_id)


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, msg, headers={"WWW-Authenticate": "Bearer"})


def get_caller(state: StateDep, db: SessionDep,
               creds: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]) -> Caller:
    if creds is None or not creds.credentials:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    token = creds.credentials
    admin = state.settings.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return Caller(device=None, admin=True)
    device = db.scalar(select(Device).where(Device.token_hash == hash_token(token)))
    # End the read transaction now (commit: with expire_on_commit=False, `device` is not expired), so the request does not hold a pooled connection while it streams an
    # upload or waits for a worker thread (which opens its own session): with 2 connections per upload,
    # ~pool-size concurrent uploads exhausted the pool and answered 500 (QueuePool TimeoutError).
    # Sessions use expire_on_commit=False, so `device` stays readable; later queries re-acquire a connection.
    db.commit()
    if device is None:
        raise _unauthorized("invalid token")
    return Caller(device=device, admin=False)


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_device(caller: CallerDep) -> Device:
    if caller.device is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this route needs a device token")
    return caller.device


def require_admin(state: StateDep, caller: CallerDep) -> Caller:
    if not state.settings.admin_token:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the admin API is disabled (no admin token configured)")
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this route needs the admin token")
    return caller


DeviceDep = Annotated[Device, Depends(require_device)]
AdminDep = Annotated[Caller, Depends(require_admin)]
