"""The fleet server over real HTTP: register, push, pull, trajectory replay, FedAvg, rejections, idempotency."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest

from patch_factory import make_patch, rewrite_doc
from server_conftest import TEST_UPLOAD_LIMIT, backend, fleet  # noqa: F401
from zoedge.device.client import FleetError
from zoedge.device.outbox import Outbox
from zoedge.manifest import Manifest, sha256_file, verify_files
from zoedge.runtime.patch import ADAPTER_FILE, PATCH_FILE, TRAJECTORY_FILE, read_patch, write_patch
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.zo import ZOConfig
from zoedge.transfer import format_files, pack, unpack


def archive_of(patch_dir, fmt, tmp_path):
    out = tmp_path / f"{patch_dir.name}-{fmt}.tar"
    sha, size = pack(patch_dir, out, format_files(patch_dir, fmt))
    return out, sha, size


def post_archive(http, data: bytes, sha: str | None = None):
    import hashlib

    headers = {"X-Zoedge-Sha256": sha or hashlib.sha256(data).hexdigest(), "Content-Type": "application/octet-stream"}
    return http.post("/v1/patches", content=data, headers=headers)


def test_register_push_pull_byte_identical(fleet, tmp_path):
    _, token = fleet.device("pi-1")
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=11, seed=11)
    archive, sha, size = archive_of(patch, "adapter", tmp_path)
    with fleet.client(token) as c:
        r = c.push(patch, "adapter", Outbox(tmp_path / "outbox"))
        assert (r["sha256"], r["bytes"], r["kind"]) == (sha, size, "adapter")
        assert Outbox(tmp_path / "outbox").entries() == []  # sent, so dequeued
        c.pull(r["patch_id"], tmp_path / "pulled")
    for name in format_files(patch, "adapter"):
        assert (tmp_path / "pulled" / name).read_bytes() == (patch / name).read_bytes(), name
    with fleet.http(token) as http:
        got = http.get(f"/v1/patches/{r['patch_id']}/archive")
        assert got.status_code == 200 and got.content == archive.read_bytes()
        again = post_archive(http, archive.read_bytes())  # the same content again: the same patch, 200
        assert again.status_code == 200 and again.json()["patch_id"] == r["patch_id"]


def test_trajectory_replayed_by_server_equals_device_tensors(fleet, tmp_path):
    _, token = fleet.device("phone-1")
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", steps=6, run_seed=21, seed=21, start_head=True)
    with fleet.client(token) as c:
        r = c.push(patch, "trajectory", Outbox(tmp_path / "outbox"))
        assert r["kind"] == "trajectory" and r["bytes"] < (patch / ADAPTER_FILE).stat().st_size + 8192
        c.pull(r["patch_id"], tmp_path / "pulled")
    with fleet.http(token) as http:
        (tmp_path / "adapter.safetensors").write_bytes(http.get(f"/v1/patches/{r['patch_id']}/adapter").content)
    device, server = load_tensors(patch / ADAPTER_FILE), load_tensors(tmp_path / "adapter.safetensors")
    assert sorted(device) == sorted(server)
    assert all(np.array_equal(device[k], server[k]) for k in device)
    # the pulled directory is the device's complete patch, byte for byte, and passes read_patch
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(p.name for p in patch.iterdir())
    for p in patch.iterdir():
        assert (tmp_path / "pulled" / p.name).read_bytes() == p.read_bytes(), p.name
    read_patch(tmp_path / "pulled")


def test_trajectory_that_does_not_replay_to_adapter_sha256_is_rejected(fleet, tmp_path):
    _, token = fleet.device()
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=31, seed=31)
    rewrite_doc(patch, adapter_sha256="0" * 64)
    archive, _, _ = archive_of(patch, "trajectory", tmp_path)
    before = fleet.stored_state()
    with fleet.http(token) as http:
        r = post_archive(http, archive.read_bytes())
    assert r.status_code == 400 and "adapter_sha256" in r.json()["detail"]
    assert fleet.stored_state() == before


def _tampered(kind, fleet, tmp_path):
    patch = make_patch(fleet.bundle_dir, tmp_path / f"p-{kind}", run_seed=41, seed=41)
    if kind == "bad file hash":
        traj = np.load(patch / TRAJECTORY_FILE)
        traj[0, 0] += 1
        np.save(patch / TRAJECTORY_FILE, traj)
        return archive_of(patch, "trajectory", tmp_path)[0].read_bytes()
    if kind == "unknown base model":
        rewrite_doc(patch, base_sha256="f" * 64, bundle_id="nope")
        return archive_of(patch, "adapter", tmp_path)[0].read_bytes()
    if kind == "unexpected file":
        (patch / "run.sh").write_text("echo hi\n")
        out = tmp_path / "evil.tar"
        pack(patch, out, [PATCH_FILE, ADAPTER_FILE, "run.sh"])
        return out.read_bytes()
    if kind == "path traversal":
        out = tmp_path / "trav.tar"
        with tarfile.open(out, "w") as t:
            t.add(patch / PATCH_FILE, arcname="../patch.json")
        return out.read_bytes()
    if kind == "not an archive":
        return os.urandom(5000)
    if kind == "truncated archive":
        return archive_of(patch, "adapter", tmp_path)[0].read_bytes()[:3000]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bad file hash", "unknown base model", "unexpected file", "path traversal",
                                  "not an archive", "truncated archive"])
def test_corrupt_upload_is_400_and_stores_nothing(fleet, tmp_path, kind):
    _, token = fleet.device()
    data = _tampered(kind, fleet, tmp_path)
    before = fleet.stored_state()
    with fleet.http(token) as http:
        r = post_archive(http, data)
    # a patch naming a bundle the server does not have may fit once it is published: 424, kept queued by the device
    assert r.status_code == (424 if kind == "unknown base model" else 400), r.text
    assert fleet.stored_state() == before


def test_declared_sha256_must_match_the_bytes(fleet, tmp_path):
    _, token = fleet.device()
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=51, seed=51)
    archive, sha, _ = archive_of(patch, "adapter", tmp_path)
    before = fleet.stored_state()
    with fleet.http(token) as http:
        wrong = post_archive(http, archive.read_bytes(), sha="a" * 64)
        missing = http.post("/v1/patches", content=archive.read_bytes())
    assert wrong.status_code == 400 and "declared" in wrong.json()["detail"]
    assert missing.status_code == 400 and "X-Zoedge-Sha256" in missing.json()["detail"]
    assert fleet.stored_state() == before


def test_upload_over_the_size_limit_is_413(fleet, tmp_path):
    _, token = fleet.device()
    before = fleet.stored_state()
    with fleet.http(token) as http:
        r = post_archive(http, os.urandom(TEST_UPLOAD_LIMIT + 200_000))
    assert r.status_code == 413 and str(TEST_UPLOAD_LIMIT) in r.json()["detail"]
    # through the client: a patch with a big start.safetensors; refused, moved out of the queue
    m = Manifest.load(fleet.bundle_dir)
    big = tmp_path / "big"
    write_patch(big, m, {"x": np.ones(300_000, np.float32)}, np.zeros((0, 2), np.float32), {},
                {"steps": 0, "run_seed": 0, "zo": ZOConfig().to_dict(), "examples": 1})
    box = Outbox(tmp_path / "outbox")
    with fleet.client(token) as c, pytest.raises(FleetError) as e:
        c.push(big, "adapter", box)
    assert e.value.status == 413 and "413" in str(e.value)
    assert box.entries() == [] and len(list((box.root / "rejected").glob("*.tar"))) == 1
    assert fleet.stored_state() == before


def test_fedavg_of_two_patches_is_the_weighted_average(fleet, tmp_path):
    (a_id, a), (_, b) = fleet.device("a"), fleet.device("b")
    pa = make_patch(fleet.bundle_dir, tmp_path / "pa", run_seed=61, seed=61, examples=100, lr=1e-2)
    pb = make_patch(fleet.bundle_dir, tmp_path / "pb", run_seed=62, seed=62, examples=300, lr=1e-2)
    with fleet.client(a) as ca, fleet.client(b) as cb:
        ra = ca.push(pa, "adapter", Outbox(tmp_path / "oa"))
        rb = cb.push(pb, "trajectory", Outbox(tmp_path / "ob"))
    with fleet.admin() as admin:
        previous = max([p["version"] for p in admin.list_patches(bundle_id=fleet.bundle_id, kind="global")] or [0])
        g = admin.aggregate(fleet.bundle_id, [ra["patch_id"], rb["patch_id"]])
        g2 = admin.aggregate(fleet.bundle_id, [g["patch_id"], ra["patch_id"]])
    assert (g["kind"], g["version"], g["examples"], g["device_id"]) == ("global", previous + 1, 400, None)
    assert g["parent_ids"] == [ra["patch_id"], rb["patch_id"]] and g2["version"] == previous + 2
    with fleet.client(a) as ca:  # a global patch is readable by every device
        ca.pull(g["patch_id"], tmp_path / "global")
    ta, tb = load_tensors(pa / ADAPTER_FILE), load_tensors(pb / ADAPTER_FILE)
    tg = load_tensors(tmp_path / "global" / ADAPTER_FILE)
    assert read_patch(tmp_path / "global")["version"] == previous + 1
    for k in ta:
        expected = np.average(np.stack([ta[k], tb[k]]).astype(np.float64), axis=0, weights=[100, 300])
        assert tg[k].dtype == np.float32
        np.testing.assert_allclose(tg[k], expected, rtol=1e-6, atol=1e-9)
    assert any(not np.array_equal(tg[k], ta[k]) for k in ta)
    # device patches uploaded now belong to the new round
    p3 = make_patch(fleet.bundle_dir, tmp_path / "p3", run_seed=63, seed=63)
    with fleet.client(a) as ca:
        r3 = ca.push(p3, "adapter", Outbox(tmp_path / "oa"))
        assert r3["version"] == previous + 2
        assert [p["patch_id"] for p in ca.list_patches(version=previous + 2, device_id=a_id)] == [r3["patch_id"]]


def _one_pushed_patch(fleet, tmp_path, seed: int) -> dict:
    """A new device pushes one adapter patch; the server's answer."""
    _, token = fleet.device()
    p = make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=seed, seed=seed)
    with fleet.client(token) as c:
        return c.push(p, "adapter", Outbox(tmp_path / "o"))


def test_aggregate_refuses_unknown_or_repeated_patches(fleet, tmp_path):
    r = _one_pushed_patch(fleet, tmp_path, 71)
    with fleet.http(fleet.admin_token) as http:
        url = f"/v1/bundles/{fleet.bundle_id}/aggregate"
        assert http.post(url, json={"patch_ids": [r["patch_id"], r["patch_id"]]}).status_code == 400
        assert http.post(url, json={"patch_ids": ["0" * 32]}).status_code == 404
        assert http.post(url, json={"patch_ids": []}).status_code == 422
        assert http.post("/v1/bundles/nope/aggregate", json={"patch_ids": [r["patch_id"]]}).status_code == 404


def test_aggregate_takes_unique_id_prefixes(fleet, tmp_path):
    r = _one_pushed_patch(fleet, tmp_path, 72)
    with fleet.http(fleet.admin_token) as http:
        g = http.post(f"/v1/bundles/{fleet.bundle_id[:8]}/aggregate", json={"patch_ids": [r["patch_id"][:8]]})
    assert g.status_code == 201, g.text
    assert g.json()["parent_ids"] == [r["patch_id"]] and g.json()["bundle_id"] == fleet.bundle_id


def test_bundle_metadata_download_and_republish(fleet, tmp_path):
    _, token = fleet.device()
    with fleet.http(token) as http:
        meta = http.get(f"/v1/bundles/{fleet.bundle_id}").json()
        assert meta["manifest"]["bundle_id"] == fleet.bundle_id
        assert [b["bundle_id"] for b in http.get("/v1/bundles").json()] == [fleet.bundle_id]
        (tmp_path / "b.tar").write_bytes(http.get(f"/v1/bundles/{fleet.bundle_id}/archive").content)
    assert sha256_file(tmp_path / "b.tar") == meta["sha256"]
    unpack(tmp_path / "b.tar", tmp_path / "b")
    verify_files(tmp_path / "b", Manifest.load(tmp_path / "b"))
    with fleet.admin() as admin:  # publishing again is idempotent
        assert admin.publish_bundle(fleet.bundle_dir)["bundle_id"] == fleet.bundle_id
    (tmp_path / "b" / "tokenizer.json").write_text("{}")  # no longer matches the manifest
    before = fleet.stored_state()
    with fleet.admin() as admin, pytest.raises(FleetError) as e:
        admin.publish_bundle(tmp_path / "b")
    assert e.value.status == 400 and "tokenizer.json" in str(e.value)
    assert fleet.stored_state() == before


def test_health_metrics_and_openapi(fleet, tmp_path):
    _, token = fleet.device()
    with fleet.client(token) as c:
        c.push(make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=81, seed=81), "adapter", Outbox(tmp_path / "o"))
    with fleet.http() as http:
        assert http.get("/v1/health").json()["status"] == "ok"
        assert http.get("/metrics").status_code == 401  # behind a token by default
        spec = http.get("/openapi.json").json()
    with fleet.http(fleet.admin_token) as http:
        text = http.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    with fleet.http(fleet.admin_token) as http:
        n_devices = len(http.get("/v1/devices").json())
        n_patches = len(http.get("/v1/patches").json())
    assert values["zoedge_devices"] == n_devices
    assert sum(v for k, v in values.items() if k.startswith("zoedge_patches{")) == n_patches
    assert values['zoedge_uploads_total{result="created"}'] >= 1 and values["zoedge_upload_bytes_total"] > 0
    assert values['zoedge_patch_bytes{kind="adapter"}'] > 0
    assert {"/v1/patches", "/v1/devices", "/v1/bundles/{bundle_id}/aggregate"} <= set(spec["paths"])
    assert "application/octet-stream" in spec["paths"]["/v1/patches"]["post"]["requestBody"]["content"]


def test_dashboard_lists_patches_with_accuracy(fleet, tmp_path):
    _, token = fleet.device("<b>kitchen-pi</b>")
    with fleet.client(token) as c:
        r = c.push(make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=91, seed=91, accuracy=0.8125),
                   "adapter", Outbox(tmp_path / "o"))
    with fleet.http(fleet.admin_token) as http:
        page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert r["patch_id"] in html and "0.812" in html and "<svg" in html
    assert "&lt;b&gt;kitchen-pi&lt;/b&gt;" in html and "<b>kitchen-pi" not in html


def test_out_of_range_query_integer_is_422_not_500(fleet):
    """Found by the schema fuzz: a version beyond int64 overflowed the database driver (500)."""
    _, token = fleet.device()
    with fleet.http() as http:
        r = http.get("/v1/patches", params={"version": 698335449393625300992},
                     headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 422


def test_aggregate_needs_one_prompt_template_and_the_global_patch_carries_it(fleet, tmp_path):
    """Decoder patches may pick their own prompt; averaging heads fitted through different prompts is refused."""
    _, a = fleet.device()
    ids = []
    for i, template in enumerate(("A: {sentence}", "B: {sentence}", "A: {sentence}")):
        p = make_patch(fleet.bundle_dir, tmp_path / f"p{i}", run_seed=80 + i, seed=80 + i)
        rewrite_doc(p, prompt_template=template)
        with fleet.client(a) as c:
            ids.append(c.push(p, "adapter", Outbox(tmp_path / f"o{i}"))["patch_id"])
    with fleet.http(fleet.admin_token) as http:
        r = http.post(f"/v1/bundles/{fleet.bundle_id}/aggregate", json={"patch_ids": ids[:2]})
        assert r.status_code == 400 and "different prompt templates" in r.text
    with fleet.admin() as admin:
        g = admin.aggregate(fleet.bundle_id, [ids[0], ids[2]])
    with fleet.client(a) as c:
        c.pull(g["patch_id"], tmp_path / "global")
    assert read_patch(tmp_path / "global")["prompt_template"] == "A: {sentence}"
