"""Offline API docs (Swagger UI / ReDoc from packaged assets, rendered by headless Chromium with the network cut off)
and the dashboard and /metrics behind the admin or read-only token by default (issue 15)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import httpx
import pytest

from server_conftest import ADMIN, LiveServer, backend, fleet, make_settings  # noqa: F401
from zoedge.server.apidocs import assets_dir

READ = "read-only-token"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    live = LiveServer(make_settings(tmp_path_factory.mktemp("docs-srv"), "sqlite", read_token=READ)).start()
    yield live
    live.stop()


def get(srv, path, token=None, auth=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(srv.url + path, headers=headers, auth=auth, timeout=30)


def test_dashboard_and_metrics_need_the_admin_or_read_token(srv, tmp_path):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        device_token = admin.post("/v1/devices", json={"name": "d"}).json()["token"]
    for path in ("/", "/metrics"):
        r = get(srv, path)
        assert r.status_code == 401 and "token" in r.json()["detail"]
        assert get(srv, path, device_token).status_code == 401  # a device token does not open it
        assert get(srv, path, "wrong").status_code == 401
        assert get(srv, path, ADMIN).status_code == 200
        assert get(srv, path, READ).status_code == 200
    # a browser is asked for a password (HTTP Basic), and the token works as one
    assert get(srv, "/").headers["WWW-Authenticate"].startswith("Basic ")
    assert get(srv, "/", auth=("anyone", READ)).status_code == 200
    assert get(srv, "/", auth=("anyone", "nope")).status_code == 401
    # the read token is not an API token
    assert get(srv, "/v1/devices", READ).status_code == 401


def test_public_dashboard_and_metrics_when_configured(tmp_path):
    live = LiveServer(make_settings(tmp_path, "sqlite", public_dashboard=True, public_metrics=True)).start()
    try:
        assert get(live, "/").status_code == 200 and get(live, "/metrics").status_code == 200
    finally:
        live.stop()


def test_docs_pages_load_only_local_assets(srv):
    assert assets_dir() is not None, "fastapi-offline is not installed (the server extra)"
    for page in ("/docs", "/redoc"):
        r = get(srv, page)
        assert r.status_code == 200, r.text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*'([^']+)'""", r.text)
        urls = [a or b for a, b in urls]
        assert urls and not [u for u in urls if "://" in u], urls  # nothing from a CDN
        assert "cdn.jsdelivr" not in r.text and "fonts.googleapis" not in r.text
        for u in urls:
            if u.startswith("/docs-assets/"):
                asset = get(srv, u)
                assert asset.status_code == 200 and len(asset.content) > 1000, u


def test_swagger_ui_renders_the_operations_in_headless_chromium_offline(srv):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("NO CHROMIUM INSTALLED: the offline /docs rendering test did not run (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            # the network is off: every host but the loopback server fails to resolve
                            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
                            "--proxy-bypass-list=127.0.0.1", f"--user-data-dir={profile}",
                            "--virtual-time-budget=15000", "--dump-dom", srv.url + "/docs"],
                           capture_output=True, text=True, timeout=120)
    dom = p.stdout
    assert "swagger-ui" in dom, p.stderr[-800:]
    # the operations Swagger UI rendered from /openapi.json
    for path in ("/v1/patches", "/v1/bundles/{bundle_id}/archive", "/v1/devices"):
        assert f'data-path="{path}"' in dom or f">{path}<" in dom, path
    assert "opblock" in dom
