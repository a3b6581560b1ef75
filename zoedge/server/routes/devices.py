"""Device registration (admin) and identity."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, status
from sqlalchemy import select

from zoedge.server.deps import AdminDep, DeviceDep, SessionDep, hash_token
from zoedge.server.models import Device
from zoedge.server.schemas import DeviceCreate, DeviceCreated, DeviceOut

router = APIRouter(prefix="/devices", tags=["devices"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceCreated)
def register_device(body: DeviceCreate, db: SessionDep, _: AdminDep) -> DeviceCreated:
    """Register a device; its bearer token is returned once and stored only as a sha256."""
    token = "zd_" + secrets.token_urlsafe(32)
    device = Device(name=body.name, token_hash=hash_token(token))
    db.add(device)
    db.commit()
    return DeviceCreated(device_id=device.id, name=device.name, token=token)


@router.get("", response_model=list[DeviceOut])
def list_devices(db: SessionDep, _: AdminDep) -> list[Device]:
    return list(db.scalars(select(Device).order_by(Device.created)))


@router.get("/me", response_model=DeviceOut)
def whoami(device: DeviceDep) -> Device:
    return device
