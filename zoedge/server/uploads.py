"""Receiving an upload body: streamed to a temp file in the blob store, hashed, size-limited."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import HTTPException, Request, status

from zoedge.transfer import SHA256_HEADER
DRAIN_FACTOR = 4  # bodies up to this many times the limit are read to the end, so the client sees the 413

RAW_ARCHIVE_BODY = {
    "requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}},
        "description": f"A tar (optionally compressed) or zip archive; header {SHA256_HEADER}: its sha256"},
}


def too_large(size: int | str, limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"upload is {size} bytes; this server accepts at most {limit} bytes")


async def receive_body(request: Request, dest: Path, limit: int) -> tuple[str, int]:
    """Write the request body to dest; return (sha256, bytes). 413 beyond `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_large(declared, limit)
    h = hashlib.sha256()
    size = 0
    with open(dest, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                break
            if size <= limit:
                h.update(chunk)
                f.write(chunk)
    if size > limit:
        raise too_large(size, limit)
    return h.hexdigest(), size


def check_declared_sha256(request: Request, actual: str, required: bool) -> None:
    declared = request.headers.get(SHA256_HEADER, "").strip().lower()
    if not declared:
        if required:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"missing {SHA256_HEADER} header (sha256 of the body)")
        return
    if declared != actual:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"body sha256 {actual[:12]}… does not match the declared {declared[:12]}… "
                            "(corrupted in transit?)")
