"""Request and response bodies (the OpenAPI schema at /openapi.json is generated from these)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# SQLite hands back naive datetimes (stored UTC): without an offset they are not RFC 3339 "date-time".
UtcDatetime = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=timezone.utc))]


class DeviceCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class DeviceCreated(BaseModel):
    device_id: str
    name: str
    token: str = Field(description="Bearer token for this device; shown once, stored hashed")


class DeviceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    created: UtcDatetime


class BundleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    bundle_id: str = Field(validation_alias="id")
    model_id: str
    base_sha256: str
    initial_sha256: str
    sibling_key: Optional[str] = Field(None, description="bundles with the same key are siblings: exports of one "
                                       "base with the same trainables, which share their patches")
    sha256: str = Field(description="sha256 of the bundle archive served at /archive")
    bytes: int
    created: UtcDatetime


class BundleDetail(BundleOut):
    manifest: dict[str, Any]


class PatchOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    patch_id: str = Field(validation_alias="id")
    device_id: Optional[str]
    bundle_id: str
    kind: str = Field(description="adapter | trajectory | coefficients (device uploads) | global (an aggregate)")
    sha256: str = Field(description="sha256 of the archive as uploaded: the idempotency key")
    bytes: int
    archive_sha256: str = Field(description="sha256 of the complete patch archive served at /archive")
    adapter_sha256: str = Field(description="tensor digest of the adapter, as in patch.json")
    version: int = Field(description="global: its version; device patch: the global version current at upload")
    steps: int
    examples: int
    metrics: dict[str, Any]
    parent_ids: Optional[list[str]]
    created: UtcDatetime


class AggregateRequest(BaseModel):
    patch_ids: list[str] = Field(min_length=1, description="Patches of this bundle to average (FedAvg)")


class Health(BaseModel):
    status: str
    database: str
