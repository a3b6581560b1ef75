"""The dashboard rendered by a real browser (headless Chromium) when one is installed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from patch_factory import make_patch
from server_conftest import backend, fleet  # noqa: F401
from zoedge.device.outbox import Outbox

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_dashboard_screenshot_in_headless_chromium(fleet, backend, tmp_path):
    if backend != "sqlite":
        pytest.skip("the browser check runs once, on the SQLite server")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("NO CHROMIUM INSTALLED: the dashboard screenshot test did not run (apt-get install chromium)")
    _, token = fleet.device("screenshot-pi")
    with fleet.client(token) as c:
        c.push(make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=7001, seed=7001), "adapter", Outbox(tmp_path / "o"))
    shot = tmp_path / "dashboard.png"
    # the dashboard needs the admin token: a browser sends it as the password of HTTP Basic auth
    page = fleet.url.replace("http://", f"http://admin:{fleet.admin_token}@") + "/"
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={profile}", "--window-size=1200,900", f"--screenshot={shot}",
                            page], capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {p.returncode}): {p.stderr[-800:]}"
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a rendered page, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    # the DOM Chromium rendered lists the patches
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run",
                              f"--user-data-dir={profile}", "--dump-dom", page],
                             capture_output=True, text=True, timeout=90).stdout
    assert "screenshot-pi" in dom and "<svg" in dom and "0.800" in dom
