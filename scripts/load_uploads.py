#!/usr/bin/env python
"""Concurrent patch uploads against a fleet server on loopback (issue 7): none lost, none duplicated.

Builds N distinct patch archives of the tiny-bert bundle (one trained-format patch, its patch.json varied per
archive; every 10th sent in the trajectory format, which the server replays), registers D devices, and fires
all uploads at once (asyncio + httpx, one connection per request); the first K archives are sent twice
concurrently by the same device (idempotency by sha256). Then it lists the patches as the admin and checks
that every archive is stored exactly once, under the id its upload(s) returned, with the right device.

    .venv/bin/python scripts/load_uploads.py --start sqlite --n 200 --json
    eval "$(bash scripts/ci_postgres.sh)"; .venv/bin/python scripts/load_uploads.py --start postgresql --n 200
    .venv/bin/python scripts/load_uploads.py --server http://127.0.0.1:8080 --admin-token T --bundle DIR

Only loopback servers are accepted. Exit 0 when nothing was lost or duplicated and every upload got 200/201.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def build_archives(bundle: Path, work: Path, n: int) -> list[tuple[bytes, str, str]]:
    """n distinct (archive bytes, sha256, format) of valid patches of `bundle`."""
    from patch_factory import make_patch

    from zoedge.transfer import format_files, pack

    base = make_patch(bundle, work / "base", steps=3, run_seed=7, seed=7)
    out = []
    for i in range(n):
        d = work / f"p{i:04d}"
        shutil.copytree(base, d)
        doc = json.loads((d / "patch.json").read_text())
        doc["metrics"] = {"eval_accuracy": 0.5 + (i % 50) / 100, "load_index": i}
        doc["examples"] = 10 + i
        (d / "patch.json").write_text(json.dumps(doc))
        fmt = "trajectory" if i % 10 == 9 else "adapter"
        tar = work / f"p{i:04d}.tar"
        sha, _ = pack(d, tar, format_files(d, fmt))
        out.append((tar.read_bytes(), sha, fmt))
        shutil.rmtree(d)
    return out


async def fire(url: str, jobs: list[tuple[str, bytes, str, str]], timeout: float) -> list[tuple[int, dict | str]]:
    import httpx

    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def one(token: str, data: bytes, sha: str, fmt: str):
            headers = {"Authorization": f"Bearer {token}", "X-Zoedge-Sha256": sha, "X-Zoedge-Format": fmt,
                       "Content-Type": "application/octet-stream"}
            try:
                r = await http.post("/v1/patches", content=data, headers=headers)
            except httpx.HTTPError as e:
                return -1, f"{type(e).__name__}: {e}"
            try:
                return r.status_code, r.json()
            except ValueError:
                return r.status_code, r.text[:200]
        return await asyncio.gather(*(one(*j) for j in jobs))


def run_load(url: str, admin_token: str, bundle: Path, n: int, devices: int, dups: int, timeout: float = 300) -> dict:
    import httpx

    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"load_uploads: refusing non-loopback server {url}")
    from zoedge.device.client import FleetClient

    t0 = time.monotonic()
    with FleetClient(url, admin_token, retries=2, backoff=0.1) as admin:
        admin.publish_bundle(bundle)
        tokens = {}
        for i in range(devices):
            r = admin.register_device(f"load-{i}")
            tokens[r["device_id"]] = r["token"]
    ids = list(tokens)
    with tempfile.TemporaryDirectory(prefix="zoedge-load-") as tmp:
        archives = build_archives(bundle, Path(tmp), n)
    owner = {sha: ids[i % devices] for i, (_, sha, _) in enumerate(archives)}
    jobs = [(tokens[owner[sha]], data, sha, fmt) for data, sha, fmt in archives]
    jobs += [(tokens[owner[sha]], data, sha, fmt) for data, sha, fmt in archives[:dups]]
    t1 = time.monotonic()
    results = asyncio.run(fire(url, jobs, timeout))
    t2 = time.monotonic()
    statuses = collections.Counter(code for code, _ in results)
    by_sha: dict[str, set[str]] = collections.defaultdict(set)
    errors = []
    for (_, _, sha, _), (code, body) in zip(jobs, results):
        if code in (200, 201) and isinstance(body, dict):
            by_sha[sha].add(body["patch_id"])
            if body["sha256"] != sha or body["device_id"] != owner[sha]:
                errors.append(f"{sha[:12]}: answer for another archive/device: {body}")
        else:
            errors.append(f"{sha[:12]}: {code} {str(body)[:200]}")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60) as http:
        rows = http.get("/v1/patches", params={"limit": 10000}).json()
    ours = [r for r in rows if r["sha256"] in owner]
    stored = collections.Counter(r["sha256"] for r in ours)
    lost = [s for s in owner if stored[s] == 0]
    duplicated = [s for s, c in stored.items() if c > 1]
    split_ids = [s for s, pids in by_sha.items() if len(pids) > 1]
    wrong_id = [r["sha256"] for r in ours if by_sha.get(r["sha256"]) and r["patch_id"] not in by_sha[r["sha256"]]]
    wrong_device = [r["sha256"] for r in ours if r["device_id"] != owner[r["sha256"]]]
    report = {
        "server": url, "requests": len(jobs), "unique_archives": n, "duplicate_sends": dups, "devices": devices,
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "created": statuses.get(201, 0),
        "stored_rows": len(ours), "lost": len(lost), "duplicated": len(duplicated),
        "one_id_per_archive": not split_ids, "wrong_id": len(wrong_id), "wrong_device": len(wrong_device),
        "errors": errors[:10], "seconds_upload": round(t2 - t1, 2), "seconds_total": round(time.monotonic() - t0, 2),
    }
    report["ok"] = (not errors and not lost and not duplicated and not split_ids and not wrong_id
                    and not wrong_device and len(ours) == n and statuses.get(201, 0) == n)
    return report


def start_server(backend: str, data_dir: Path):
    from server_conftest import ADMIN, PG_ENV, LiveServer, make_settings, reset_postgres

    if backend == "postgresql":
        if not os.environ.get(PG_ENV):
            raise SystemExit(f"load_uploads: set {PG_ENV} (eval \"$(bash scripts/ci_postgres.sh)\")")
        reset_postgres(os.environ[PG_ENV])
    return LiveServer(make_settings(data_dir, backend)).start(), ADMIN


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", choices=["sqlite", "postgresql"], help="start a server in this process on loopback")
    ap.add_argument("--server", help="an already running server (loopback only)")
    ap.add_argument("--admin-token", default="", help="its admin token")
    ap.add_argument("--bundle", type=Path, help="tiny-bert bundle (default: export one)")
    ap.add_argument("--n", type=int, default=200, help="distinct archives (default 200)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--dups", type=int, default=20, help="archives also sent a second time, concurrently")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if bool(args.start) == bool(args.server):
        ap.error("give exactly one of --start or --server")
    with tempfile.TemporaryDirectory(prefix="zoedge-load-srv-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from conftest import export_tiny

            bundle = export_tiny(Path(tmp) / "tiny-bert", "tiny-bert")
        live = None
        try:
            if args.start:
                live, token = start_server(args.start, Path(tmp) / "data")
                url = live.url
            else:
                url, token = args.server, args.admin_token
            report = run_load(url, token, bundle, args.n, args.devices, args.dups)
            report["backend"] = args.start or "external"
        finally:
            if live is not None:
                live.stop()
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
