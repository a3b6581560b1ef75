"""The device client: retries and backoff, the outbox across restarts, and the fleet CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from patch_factory import make_patch
from server_conftest import ADMIN, LiveServer, backend, fleet, free_port, make_settings  # noqa: F401
from zoedge.device.client import FleetClient, FleetError, ServerUnreachable
from zoedge.device.outbox import Outbox
from zoedge.runtime.patch import ADAPTER_FILE, TRAJECTORY_FILE, read_patch
from zoedge.runtime.tensors import load_tensors

BOOT = "from zoedge.cli import app; app(prog_name='zoedge')"


def zoedge(*args, timeout=120) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with the fleet commands registered (cli.py may or may not do it yet)."""
    return subprocess.run([sys.executable, "-c", BOOT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def last_json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoedge: error: "), p.stderr
    return lines[0]


# ---- retries and backoff (no network) ------------------------------------------------------------------
def scripted(*answers):
    calls = []

    def handler(request):
        calls.append(request)
        a = answers[min(len(calls), len(answers)) - 1]
        if isinstance(a, Exception):
            raise a
        return httpx.Response(a, json={"detail": f"answer {a}"})

    return httpx.MockTransport(handler), calls


def test_retries_5xx_and_connection_errors_with_exponential_backoff():
    transport, calls = scripted(httpx.ConnectError("refused"), 503, 502, 200)
    sleeps = []
    with FleetClient("http://fleet", "t", transport=transport, retries=4, backoff=0.5, sleep=sleeps.append) as c:
        assert c.request("GET", "/v1/patches").status_code == 200
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_the_retries_with_one_clear_line():
    transport, calls = scripted(httpx.ConnectError("refused"))
    with FleetClient("http://fleet", "t", transport=transport, retries=3, sleep=lambda s: None) as c:
        with pytest.raises(ServerUnreachable, match=r"cannot reach http://fleet after 4 attempts"):
            c.request("GET", "/v1/patches")
    assert len(calls) == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_client_errors_are_not_retried(status):
    transport, calls = scripted(status)
    with FleetClient("http://fleet", "t", transport=transport, sleep=lambda s: None) as c:
        with pytest.raises(FleetError, match=rf"\({status}\): answer {status}") as e:
            c.request("GET", "/v1/patches")
    assert e.value.status == status and len(calls) == 1


def test_registration_is_not_retried_after_a_server_error():
    transport, calls = scripted(500, 201)
    with FleetClient("http://fleet", "t", transport=transport, sleep=lambda s: None) as c:
        with pytest.raises(FleetError):
            c.register_device("x")  # a retry could register the device twice
    assert len(calls) == 1


# ---- the outbox --------------------------------------------------------------------------------------
def test_outbox_entries_are_atomic_and_idempotent(tiny_bert_bundle, tmp_path):
    patch = make_patch(tiny_bert_bundle, tmp_path / "p", run_seed=3, seed=3)
    box = Outbox(tmp_path / "box")
    e1, e2 = box.enqueue_patch(patch, "adapter"), box.enqueue_patch(patch, "adapter")
    assert e1 == e2 and len(box.entries()) == 1
    (box.root / ".pack-crashed.tar").write_bytes(b"half")  # a crash while packing leaves only this
    (box.root / ("f" * 64 + ".tar")).write_bytes(b"no metadata: never completed")
    assert [e.sha256 for e in Outbox(box.root).entries()] == [e1.sha256]
    box.archive_path(e1.sha256).write_bytes(b"bit rot")  # a corrupt archive is set aside, not sent
    assert Outbox(box.root).entries() == [] and (box.root / "rejected" / f"{e1.sha256}.tar").is_file()


def test_outbox_survives_a_client_restart(backend, tiny_bert_bundle, tmp_path):
    """Queue while the server is down, drop the client, start the server, sync with a new client."""
    if backend != "sqlite":
        pytest.skip("one backend is enough: the outbox is client-side")
    settings = make_settings(tmp_path / "srv", "sqlite")
    port = free_port()
    live = LiveServer(settings, port).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            admin.publish_bundle(tiny_bert_bundle)
            token = admin.register_device("offline-pi")["token"]
    finally:
        live.stop()
    patches = [make_patch(tiny_bert_bundle, tmp_path / f"p{i}", run_seed=500 + i, seed=500 + i) for i in range(2)]
    client = FleetClient(live.url, token, retries=1, backoff=0.01)
    for patch, fmt in zip(patches, ("adapter", "trajectory")):
        with pytest.raises(ServerUnreachable, match="stays queued"):
            client.push(patch, fmt, Outbox(tmp_path / "box"))
    client.close()
    del client
    queued = Outbox(tmp_path / "box").entries()  # a new process would see the same
    assert [e.format for e in queued] == ["adapter", "trajectory"] and all(e.attempts == 1 for e in queued)

    live = LiveServer(settings, port).start()
    try:
        with FleetClient(live.url, token) as client:
            result = client.sync(Outbox(tmp_path / "box"))
            assert len(result.sent) == 2 and result.failed == []
            assert Outbox(tmp_path / "box").entries() == []
            stored = client.list_patches()
            assert sorted(p["sha256"] for p in stored) == sorted(e.sha256 for e in queued)
            # a crash after the upload but before dequeuing: sending again is harmless
            again = Outbox(tmp_path / "box").enqueue_patch(patches[0], "adapter")
            assert client.sync(Outbox(tmp_path / "box")).sent[0]["patch_id"] == next(
                p["patch_id"] for p in stored if p["sha256"] == again.sha256)
            assert len(client.list_patches()) == 2
    finally:
        live.stop()


# ---- the CLI -----------------------------------------------------------------------------------------
def test_cli_register_publish_push_pull_sync(fleet, backend, tmp_path):
    if backend != "sqlite":
        pytest.skip("the CLI is backend-independent")
    url = fleet.url
    reg = last_json(zoedge("device", "register", "--server", url, "--admin-token", ADMIN, "--name", "cli-pi", "--json"))
    assert set(reg) == {"device_id", "token"}
    pub = last_json(zoedge("bundle", "publish", fleet.bundle_dir, "--server", url, "--admin-token", ADMIN, "--json"))
    assert pub["bundle_id"] == fleet.bundle_id and len(pub["sha256"]) == 64 and pub["bytes"] > 0
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=901, seed=901, start_head=True)
    box = tmp_path / "box"
    pushed = last_json(zoedge("push", patch, "--server", url, "--token", reg["token"], "--format", "trajectory",
                              "--outbox", box, "--json"))
    assert set(pushed) == {"patch_id", "sha256", "bytes"}
    pulled = last_json(zoedge("pull", "--server", url, "--token", reg["token"], "--patch", pushed["patch_id"],
                              "--out", tmp_path / "pulled", "--json"))
    assert pulled["patch_id"] == pushed["patch_id"]
    for p in patch.iterdir():
        assert (tmp_path / "pulled" / p.name).read_bytes() == p.read_bytes()
    # pull refuses a non-empty directory and leaves it alone
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    line = one_error_line(zoedge("pull", "--server", url, "--token", reg["token"], "--patch", pushed["patch_id"],
                                 "--out", tmp_path / "busy"))
    assert "not an empty directory" in line and (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # a wrong token: one line, exit != 0, the patch stays queued for a later sync
    patch2 = make_patch(fleet.bundle_dir, tmp_path / "p2", run_seed=902, seed=902)
    line = one_error_line(zoedge("push", patch2, "--server", url, "--token", "wrong", "--outbox", box))
    assert "401" in line and len(Outbox(box).entries()) == 1
    synced = last_json(zoedge("sync", "--server", url, "--token", reg["token"], "--outbox", box, "--json"))
    assert len(synced["sent"]) == 1 and synced["queued"] == 0
    # the server unreachable: one line, exit != 0, queued
    patch3 = make_patch(fleet.bundle_dir, tmp_path / "p3", run_seed=903, seed=903)
    dead = f"http://127.0.0.1:{free_port()}"
    p = zoedge("push", patch3, "--server", dead, "--token", reg["token"], "--outbox", box, timeout=180)
    assert "cannot reach" in one_error_line(p) and len(Outbox(box).entries()) == 1
    # admin errors
    assert "401" in one_error_line(zoedge("device", "register", "--server", url, "--admin-token", "nope",
                                          "--name", "x"))


def test_cli_patch_replay_offline(tiny_bert_bundle, tmp_path):
    patch = make_patch(tiny_bert_bundle, tmp_path / "p", steps=5, run_seed=77, seed=77, start_head=True)
    trajectory_only = tmp_path / "t"
    trajectory_only.mkdir()
    for name in ("patch.json", TRAJECTORY_FILE, "start.safetensors"):
        (trajectory_only / name).write_bytes((patch / name).read_bytes())
    out = last_json(zoedge("patch", "replay", trajectory_only, "--bundle", tiny_bert_bundle, "--out", tmp_path / "r",
                           "--json"))
    assert out["steps"] == 5
    read_patch(tmp_path / "r")
    a, b = load_tensors(patch / ADAPTER_FILE), load_tensors(tmp_path / "r" / ADAPTER_FILE)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "r" / ADAPTER_FILE).read_bytes() == (patch / ADAPTER_FILE).read_bytes()
    line = one_error_line(zoedge("patch", "replay", trajectory_only, "--bundle", tiny_bert_bundle,
                                 "--out", tmp_path / "r"))
    assert "not an empty directory" in line


def test_cli_serve_starts_and_answers_health(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BOOT, "serve", "--port", str(port), "--data-dir", tmp_path / "d",
                             "--admin-token", "T"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "database": "sqlite"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/devices", json={"name": "x"}, headers={"Authorization": "Bearer T"})
        assert r.status_code == 201
        assert (tmp_path / "d" / "zoedge.db").is_file()
    finally:
        proc.terminate()
        proc.wait(20)
