"""ORM tables: devices, bundles, patches; rate-limit windows and counters shared by the workers."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PATCH_KINDS = ("adapter", "trajectory", "coefficients", "global")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the bearer token
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Bundle(Base):
    __tablename__ = "bundles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the manifest's bundle_id
    model_id: Mapped[str] = mapped_column(String(200))
    base_sha256: Mapped[str] = mapped_column(String(64), index=True)
    initial_sha256: Mapped[str] = mapped_column(String(64))
    # the manifest's sibling_key: bundles sharing it are siblings, one patch history (server/siblings.py)
    sibling_key: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))  # the archive blob
    bytes: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Patch(Base):
    __tablename__ = "patches"
    __table_args__ = (
        # one global aggregate per (bundle, version)
        Index("uq_global_version", "bundle_id", "version", unique=True,
              sqlite_where=text("kind = 'global'"), postgresql_where=text("kind = 'global'")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    device_id: Mapped[Optional[str]] = mapped_column(ForeignKey("devices.id"), index=True)  # None: global
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # one of PATCH_KINDS
    sha256: Mapped[str] = mapped_column(String(64), unique=True)  # of the uploaded (or aggregated) archive
    bytes: Mapped[int] = mapped_column(BigInteger)
    archive_sha256: Mapped[str] = mapped_column(String(64))  # what downloads serve: the complete patch dir
    adapter_blob: Mapped[str] = mapped_column(String(64))  # adapter_model.safetensors (uploaded or replayed)
    adapter_sha256: Mapped[str] = mapped_column(String(64))  # tensor digest, as in patch.json
    version: Mapped[int] = mapped_column(Integer, index=True)  # global: its version; device: the round
    steps: Mapped[int] = mapped_column(Integer)
    examples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_ids: Mapped[Optional[list[str]]] = mapped_column(JSON)  # global: the aggregated patches
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RateWindow(Base):
    """Hits of one rate-limited key (a device) in one fixed window; shared by every worker (ratelimit.py)."""

    __tablename__ = "rate_windows"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    window: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # floor(unix time / length)
    hits: Mapped[int] = mapped_column(Integer)


class Counter(Base):
    """A monotonically growing server-wide count (uploads by result, upload bytes): /metrics reads these."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
