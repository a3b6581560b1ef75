"""Server reliability (issue 7): schemathesis fuzzing of the OpenAPI schema (no 5xx), path traversal in archive
member names and ids, bundle ids from the manifest, size limits, the per-device rate limit, and 200 concurrent
uploads (scripts/load_uploads.py) on SQLite and, with ZOEDGE_TEST_PG_URL, PostgreSQL.

ZOEDGE_FUZZ_EXAMPLES (default 8) sets hypothesis examples per operation and token; 60 makes a ~1-2 minute run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import REPO
from patch_factory import make_patch
from server_conftest import ADMIN, PG_ENV, LiveServer, make_settings, reset_postgres
from zoedge.device.client import FleetClient
from zoedge.transfer import format_files, pack

sys.path.insert(0, str(REPO / "scripts"))

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("ZOEDGE_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def srv(tiny_bert_bundle, tmp_path_factory):
    """A private server (fuzzing litters it), rate limit off, 1 MiB uploads; a device and the bundle published."""
    live = LiveServer(make_settings(tmp_path_factory.mktemp("rel-server"), "sqlite")).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            bundle = admin.publish_bundle(tiny_bert_bundle)
            dev = admin.register_device("fuzz")
        live.bundle_id, live.device_token, live.device_id = bundle["bundle_id"], dev["token"], dev["device_id"]
        yield live
    finally:
        live.stop()


def stored(live) -> tuple[int, list[str]]:
    from sqlalchemy import func, select

    from zoedge.server.models import Patch

    with live.state.sessions() as db:
        n = db.scalar(select(func.count()).select_from(Patch))
    root = live.state.blobs.root
    return n, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "tmp" not in p.parts)


def post(live, data: bytes, token: str | None = None, path: str = "/v1/patches") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or live.device_token}", "Content-Type": "application/octet-stream",
               "X-Zoedge-Sha256": hashlib.sha256(data).hexdigest()}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        return http.post(path, content=data, headers=headers)


# ---- schemathesis ----------------------------------------------------------------------------------------------
def test_fuzz_openapi_no_server_errors(srv):
    """Every operation of /openapi.json, with the admin token, a device token and none: never a 5xx, and documented
    response bodies match the schema. (Driven through hypothesis directly: schemathesis' pytest plugin does not
    load with this repository's pytest options.)"""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    calls = []
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            for token in (ADMIN, srv.device_token, None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                case.call_and_validate(base_url=srv.url, headers=headers,
                                       checks=[not_a_server_error, response_schema_conformance])
                calls.append(op.label)

        run()
    assert len({c for c in calls}) >= 12, sorted(set(calls))
    print(f"schemathesis: {len(calls)} requests over {len(set(calls))} operations")


# ---- path traversal -----------------------------------------------------------------------------------------------
def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


TRAVERSAL = {
    "dotdot": lambda: _tar([(_member("../evil-dotdot"), b"x")]),
    "nested-dotdot": lambda: _tar([(_member("patch/../../evil-nested"), b"x")]),
    "absolute": lambda: _tar([(_member("/tmp/evil-absolute"), b"x")]),
    "symlink": lambda: _tar([(_member("patch.json", tarfile.SYMTYPE, "/etc/passwd"), b"")]),
    "hardlink": lambda: _tar([(_member("patch.json", tarfile.LNKTYPE, "/etc/passwd"), b"")]),
    "device": lambda: _tar([(_member("patch.json", tarfile.CHRTYPE), b"")]),
    "backslash": lambda: _tar([(_member("..\\evil-backslash"), b"x")]),
    "zip-dotdot": lambda: _zip("../evil-zip"),
    "zip-absolute": lambda: _zip("/evil-zipabs"),
}


def _zip(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, b"x")
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(TRAVERSAL))
def test_traversal_in_archive_member_names(srv, kind, tmp_path):
    before = stored(srv)
    data = TRAVERSAL[kind]()
    for path, token in (("/v1/patches", srv.device_token), ("/v1/bundles", ADMIN)):
        r = post(srv, data, token, path)
        assert r.status_code == 400, (path, r.status_code, r.text)
    assert stored(srv) == before
    data_dir = srv.settings.data_dir
    assert not list(data_dir.parent.rglob("evil-*")) and not Path("/tmp/evil-absolute").exists()


@pytest.mark.parametrize("ident", ["..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a" * 5000, "%00", "..;", "%2F"])
def test_traversal_in_ids(srv, ident):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as http:
        for path in (f"/v1/patches/{ident}", f"/v1/patches/{ident}/archive", f"/v1/patches/{ident}/adapter",
                     f"/v1/bundles/{ident}", f"/v1/bundles/{ident}/archive"):
            r = http.get(path)
            assert r.status_code in (307, 404, 405, 422), (path, r.status_code, r.text[:200])


def test_bundle_id_from_manifest_cannot_escape(srv, tiny_bert_bundle, tmp_path):
    """The server stores a bundle under data_dir/bundles/<manifest bundle_id>: the id must be a plain name."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bert_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["bundle_id"] = "../../escaped-bundle"
    (b / "manifest.json").write_text(json.dumps(m))
    archive = tmp_path / "b.tar"
    pack(b, archive)
    r = post(srv, archive.read_bytes(), ADMIN, "/v1/bundles")
    assert r.status_code == 400, r.text
    assert not (srv.settings.data_dir / "escaped-bundle").exists()
    assert not (srv.settings.data_dir.parent / "escaped-bundle").exists()


# ---- size limits ----------------------------------------------------------------------------------------------------
def test_archive_that_unpacks_too_large_is_400(srv):
    """A 4 MiB+ member compresses to a few KB: refused by the unpack limit (4 x max_upload_bytes), nothing stored."""
    import gzip

    before = stored(srv)
    raw = _tar([(_member("patch.json"), b"\0" * (4 * srv.settings.max_upload_bytes + 1))])
    r = post(srv, gzip.compress(raw))
    assert r.status_code == 400 and "more than" in r.json()["detail"]
    assert stored(srv) == before


def test_declared_content_length_far_over_the_limit_is_413(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/v1/patches", content=b"x" * (srv.settings.max_upload_bytes * 4 + 10),
                      headers={"Authorization": f"Bearer {srv.device_token}", "X-Zoedge-Sha256": "0" * 64})
    assert r.status_code == 413


# ---- rate limit --------------------------------------------------------------------------------------------------------
def test_per_device_rate_limit(tiny_bert_bundle, tmp_path):
    live = LiveServer(make_settings(tmp_path / "data", "sqlite", rate_limit_per_minute=3)).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            admin.publish_bundle(tiny_bert_bundle)
            a, b = admin.register_device("a"), admin.register_device("b")
        live.device_token = a["token"]
        archives = []
        for i in range(5):
            p = make_patch(tiny_bert_bundle, tmp_path / f"p{i}", run_seed=i, seed=i)
            pack(p, tmp_path / f"p{i}.tar", format_files(p, "adapter"))
            archives.append((tmp_path / f"p{i}.tar").read_bytes())
        codes = [post(live, data).status_code for data in archives[:4]]
        assert codes == [201, 201, 201, 429], codes
        r = post(live, archives[0])
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1  # duplicates count too
        assert post(live, archives[4], b["token"]).status_code == 201  # another device is not limited
    finally:
        live.stop()


# ---- 200 concurrent uploads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_200_concurrent_uploads_none_lost_none_duplicated(backend, tiny_bert_bundle, tmp_path):
    from load_uploads import run_load

    if backend == "postgresql":
        if not os.environ.get(PG_ENV):
            pytest.skip(f"{PG_ENV} is not set (scripts/ci_postgres.sh)")
        reset_postgres(os.environ[PG_ENV])
    live = LiveServer(make_settings(tmp_path / "data", backend)).start()
    try:
        report = run_load(live.url, ADMIN, tiny_bert_bundle, n=200, devices=20, dups=20)
    finally:
        live.stop()
    assert report["ok"], report
    assert report["requests"] == 220 and report["lost"] == 0 and report["duplicated"] == 0
