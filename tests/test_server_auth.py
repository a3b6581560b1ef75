"""Who may call what: every /v1 route without a token, with a wrong one, as a device, as another device."""

from __future__ import annotations

import hashlib

import pytest

from patch_factory import make_patch
from server_conftest import LiveServer, backend, fleet, make_settings  # noqa: F401
from zoedge.device.outbox import Outbox
from zoedge.transfer import format_files, pack

OPEN_ROUTES = {("GET", "/v1/health")}


@pytest.fixture(scope="module")
def two_devices(fleet, tmp_path_factory):
    """Devices A and B with one patch each, and a global aggregate of both."""
    tmp = tmp_path_factory.mktemp("auth")
    out = {}
    for name, seed in (("A", 101), ("B", 102)):
        device_id, token = fleet.device(name)
        patch = make_patch(fleet.bundle_dir, tmp / name, run_seed=seed, seed=seed)
        with fleet.client(token) as c:
            out[name] = {"id": device_id, "token": token, "patch": c.push(patch, "adapter", Outbox(tmp / f"o{name}"))}
    with fleet.admin() as admin:
        out["global"] = admin.aggregate(fleet.bundle_id, [out["A"]["patch"]["patch_id"], out["B"]["patch"]["patch_id"]])
    return out


def routes(fleet, d):
    """(method, path, kwargs, who may call it: 'admin' | 'device' | 'any')."""
    a_patch = d["A"]["patch"]["patch_id"]
    b = fleet.bundle_id
    return [
        ("POST", "/v1/devices", {"json": {"name": "x"}}, "admin"),
        ("GET", "/v1/devices", {}, "admin"),
        ("GET", "/v1/devices/me", {}, "device"),
        ("POST", "/v1/bundles", {"content": b"not a bundle"}, "admin"),
        ("GET", "/v1/bundles", {}, "any"),
        ("GET", f"/v1/bundles/{b}", {}, "any"),
        ("GET", f"/v1/bundles/{b}/archive", {}, "any"),
        ("GET", f"/v1/bundles/{b}/siblings", {}, "any"),
        ("POST", f"/v1/bundles/{b}/aggregate", {"json": {"patch_ids": [a_patch]}}, "admin"),
        ("POST", "/v1/patches", {"content": b"x", "headers": {"X-Zoedge-Sha256": hashlib.sha256(b"x").hexdigest()}},
         "device"),
        ("GET", "/v1/patches", {}, "any"),
        ("GET", f"/v1/patches/{a_patch}", {}, "any"),
        ("GET", f"/v1/patches/{a_patch}/archive", {}, "any"),
        ("GET", f"/v1/patches/{a_patch}/adapter", {}, "any"),
    ]


def test_the_matrix_covers_every_v1_route(fleet, two_devices):
    with fleet.http() as http:
        spec = http.get("/openapi.json").json()
    declared = {(m.upper(), p) for p, ops in spec["paths"].items() if p.startswith("/v1") for m in ops}
    listed = {(m, p.replace(fleet.bundle_id, "{bundle_id}").replace(two_devices["A"]["patch"]["patch_id"], "{patch_id}"))
              for m, p, _, _ in routes(fleet, two_devices)}
    assert declared - OPEN_ROUTES == listed


def test_no_token_and_wrong_token_are_401(fleet, two_devices):
    for token in (None, "wrong-token", "zd_" + "x" * 43):
        with fleet.http(token) as http:
            for method, path, kw, _ in routes(fleet, two_devices):
                r = http.request(method, path, **kw)
                assert r.status_code == 401, (token, method, path, r.status_code)
                assert r.headers.get("WWW-Authenticate") == "Bearer"


def test_roles(fleet, two_devices):
    device_token, admin_token = two_devices["A"]["token"], fleet.admin_token
    for method, path, kw, who in routes(fleet, two_devices):
        with fleet.http(device_token) as http:
            r = http.request(method, path, **kw)
            assert (r.status_code == 403) == (who == "admin"), (method, path, r.status_code)
        with fleet.http(admin_token) as http:
            r = http.request(method, path, **kw)
            assert (r.status_code == 403) == (who == "device"), (method, path, r.status_code)


def test_device_never_reads_or_overwrites_another_devices_patch(fleet, two_devices, tmp_path):
    a, b, g = two_devices["A"], two_devices["B"], two_devices["global"]
    b_patch = b["patch"]["patch_id"]
    with fleet.http(a["token"]) as http:
        for suffix in ("", "/archive", "/adapter"):
            assert http.get(f"/v1/patches/{b_patch}{suffix}").status_code == 404
            assert http.get(f"/v1/patches/{g['patch_id']}{suffix}").status_code == 200  # global: everyone
            assert http.get(f"/v1/patches/{a['patch']['patch_id']}{suffix}").status_code == 200
        visible = {p["patch_id"] for p in http.get("/v1/patches").json()}
        assert b_patch not in visible and a["patch"]["patch_id"] in visible and g["patch_id"] in visible
        assert all(p["device_id"] in (a["id"], None) for p in http.get("/v1/patches").json())
        assert http.get("/v1/patches", params={"device_id": b["id"]}).json() == []
        # re-uploading B's exact archive neither reveals nor takes over B's patch
        archive = tmp_path / "b.tar"
        src = tmp_path / "B"
        make_patch(fleet.bundle_dir, src, run_seed=102, seed=102)
        sha, _ = pack(src, archive, format_files(src, "adapter"))
        assert sha == b["patch"]["sha256"]
        r = http.post("/v1/patches", content=archive.read_bytes(), headers={"X-Zoedge-Sha256": sha})
        assert r.status_code == 409 and b_patch not in r.text
    with fleet.http(fleet.admin_token) as http:
        assert http.get(f"/v1/patches/{b_patch}").json()["device_id"] == b["id"]
        everyone = {p["patch_id"] for p in http.get("/v1/patches").json()}
        assert {a["patch"]["patch_id"], b_patch, g["patch_id"]} <= everyone


def test_admin_api_disabled_without_admin_token(backend, tmp_path):
    if backend != "sqlite":
        pytest.skip("one backend is enough for this settings check")
    import httpx

    from zoedge.server.deps import hash_token
    from zoedge.server.models import Device

    live = LiveServer(make_settings(tmp_path, "sqlite", admin_token="")).start()
    try:
        with live.state.sessions() as db:  # no admin can register one, so add a device directly
            db.add(Device(name="d", token_hash=hash_token("device-token")))
            db.commit()
        with httpx.Client(base_url=live.url, headers={"Authorization": "Bearer device-token"}) as http:
            r = http.post("/v1/devices", json={"name": "x"})
            assert r.status_code == 403 and "disabled" in r.json()["detail"]
            assert http.get("/v1/devices/me").status_code == 200
        with httpx.Client(base_url=live.url, headers={"Authorization": "Bearer anything"}) as http:
            assert http.post("/v1/devices", json={"name": "x"}).status_code == 401
    finally:
        live.stop()


def test_rate_limit_is_429_with_retry_after(backend, tiny_bert_bundle, tmp_path):
    """The limiter's hits are in the database (zoedge/server/ratelimit.py): on either backend."""
    from zoedge.device.client import FleetClient

    live = LiveServer(make_settings(tmp_path / "srv", backend, rate_limit_per_minute=2)).start()
    try:
        with FleetClient(live.url, "test-admin-token") as admin:
            admin.publish_bundle(tiny_bert_bundle)
            token = admin.register_device("busy")["token"]
        import httpx

        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {token}"}) as http:
            codes = [http.post("/v1/patches", content=b"x").status_code for _ in range(3)]
            assert codes[:2] == [400, 400] and codes[2] == 429
            r = http.post("/v1/patches", content=b"x")
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    finally:
        live.stop()
