"""The server's one settings object, read from ZOEDGE_* environment variables or given explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZOEDGE_")

    data_dir: Path = Path("zoedge-data")  # blobs, extracted bundles, the SQLite file
    database_url: str = ""  # default: sqlite file in data_dir; or postgresql://user:pw@host/db
    admin_token: str = ""  # empty: the admin API answers 403
    max_upload_bytes: int = 64 * MiB  # one patch archive
    max_bundle_bytes: int = 4096 * MiB  # one bundle archive
    rate_limit_per_minute: int = 120  # patch uploads per device and minute, all workers together; 0 = off
    # Blobs (archives, adapters): `local` = data_dir/blobs; `s3` = an S3-compatible bucket (boto3; credentials
    # from boto3's chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or an instance role)
    blob_store: str = "local"
    s3_bucket: str = ""
    s3_prefix: str = "blobs/"  # object keys: <prefix>ab/abcdef...
    s3_endpoint_url: str = ""  # "" = AWS; e.g. http://minio:9000
    s3_region: str = ""
    # `/` (device names, patch metrics) and `/metrics` need the admin token or read_token unless made public
    public_dashboard: bool = False
    public_metrics: bool = False
    read_token: str = ""  # read-only bearer token for the dashboard and /metrics (a Prometheus scraper); "" = none
    # Patch sanity (zoedge/server/sanity.py, docs/server.md): what no healthy training run produces is refused.
    max_tensor_abs: float = 1e3  # any trained value beyond ±this is refused at upload and aggregation; 0 = off
    max_norm_ratio: float = 100.0  # a tensor's L2 norm above this times its fleet median is refused; 0 = off
    norm_ratio_min_patches: int = 5  # the ratio check needs this many accepted device patches of the bundle
    auto_aggregate: int = 0  # > 0: average the round's patches into a new global once this many devices uploaded

    @property
    def db_url(self) -> str:
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, the `server` extra's driver
            return url
        return f"sqlite:///{(self.data_dir / 'zoedge.db').resolve()}"
