"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...) through boto3 (the `server` extra).

Objects are `<prefix>ab/abcdef...`, named by their sha256 and never rewritten, so any number of workers and
hosts share one bucket without coordination: two workers storing the same blob write the same bytes.
Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance
role); ZOEDGE_S3_* settings name the bucket, key prefix, endpoint and region.

Reading code that needs a file (`path`) gets a copy in a local cache directory, checked against its sha256 on
download; blobs are immutable, so the cache never goes stale (delete it any time to reclaim the space)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from zoedge.errors import ZoedgeError
from zoedge.server.blobs import CHUNK, Scratch, check_file, check_sha


class S3Store(Scratch):
    def __init__(self, client, bucket: str, prefix: str, scratch_dir: Path, cache_dir: Path):
        super().__init__(scratch_dir)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings) -> "S3Store":
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - the server extra brings boto3
            raise ZoedgeError("ZOEDGE_BLOB_STORE=s3 needs boto3: pip install 'zoedge[server]'") from e
        if not settings.s3_bucket:
            raise ZoedgeError("ZOEDGE_BLOB_STORE=s3 needs ZOEDGE_S3_BUCKET")
        client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                              region_name=settings.s3_region or None,
                              config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                            max_pool_connections=50))
        return cls(client, settings.s3_bucket, settings.s3_prefix, settings.data_dir / "tmp",
                   settings.data_dir / "blob-cache")

    def key(self, sha256: str) -> str:
        check_sha(sha256)
        return f"{self.prefix}{sha256[:2]}/{sha256}"

    def _head(self, sha256: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def put_file(self, src: Path, sha256: str) -> None:
        """Upload src after checking its sha256 (src is consumed); a blob already stored is not sent again."""
        check_file(src, sha256)
        try:
            if not self.exists(sha256):
                self.client.upload_file(str(src), self.bucket, self.key(sha256),
                                        ExtraArgs={"Metadata": {"sha256": sha256}})
        finally:
            Path(src).unlink(missing_ok=True)

    def open(self, sha256: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]

    def stream(self, sha256: str, chunk: int = CHUNK):
        body = self.open(sha256)
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise FileNotFoundError(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}")
        return int(head["ContentLength"])

    def path(self, sha256: str) -> Path:
        """A local copy (downloaded once, checked against its sha256)."""
        dest = self.cache_dir / sha256[:2] / self.key(sha256).rsplit("/", 1)[1]
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.temp_file(".fetch") as tmp:
            if self._head(sha256) is None:
                raise FileNotFoundError(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}")
            self.client.download_file(self.bucket, self.key(sha256), str(tmp))
            check_file(tmp, sha256)
            os.replace(tmp, dest)
        return dest

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        (self.cache_dir / sha256[:2] / sha256).unlink(missing_ok=True)
