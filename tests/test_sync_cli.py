"""The sync CLI of issue 15: `patches list`, `pull --latest-global`, `bundle pull`, ids as unique prefixes, full ids
on the dashboard, and the outbox keeping a patch whose bundle is not published yet (sent by `sync` once it is)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from fastapi import HTTPException
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from patch_factory import make_patch
from server_conftest import ADMIN, LiveServer, backend, fleet, make_settings  # noqa: F401
from zoedge.device.outbox import Outbox
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.server.lookup import by_id_or_prefix
from zoedge.server.models import Base, Device

BOOT = "from zoedge.cli import app; app(prog_name='zoedge')"


def zoedge(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def last_json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoedge: error: "), p.stderr
    return lines[0]


def test_list_pull_latest_global_and_prefixes(fleet, tmp_path):
    url = fleet.url
    _, token = fleet.device("lister")
    ids = []
    with fleet.client(token) as c:
        for i in range(2):
            ids.append(c.push(make_patch(fleet.bundle_dir, tmp_path / f"p{i}", run_seed=500 + i, seed=500 + i),
                              "adapter", Outbox(tmp_path / "o"))["patch_id"])
    with fleet.admin() as a:
        g1 = a.aggregate(fleet.bundle_id, ids[:1])
        g2 = a.aggregate(fleet.bundle_id, ids)
    assert g2["version"] == g1["version"] + 1

    listed = last_json(zoedge("patches", "list", "--server", url, "--token", token, "--bundle", fleet.bundle_dir,
                              "--json"))["patches"]
    mine = [p["patch_id"] for p in listed if p["device_id"] is not None]
    assert mine == ids and all(len(p["patch_id"]) == 32 for p in listed)
    assert {g1["patch_id"], g2["patch_id"]} <= {p["patch_id"] for p in listed if p["kind"] == "global"}
    table = zoedge("patches", "list", "--server", url, "--token", token, "--kind", "global")
    assert table.returncode == 0 and g2["patch_id"] in table.stdout and ids[0] not in table.stdout
    assert table.stdout.count(g2["patch_id"]) == 1

    # the newest global, the bundle named by a 12-character prefix as the dashboard used to show it
    pulled = last_json(zoedge("pull", "--server", url, "--token", token, "--latest-global", "--bundle",
                              fleet.bundle_id[:12], "--out", tmp_path / "g", "--json"))
    assert pulled["patch_id"] == g2["patch_id"] and (tmp_path / "g" / "adapter_model.safetensors").is_file()
    # a patch by a 12-character prefix
    pulled = last_json(zoedge("pull", "--server", url, "--token", token, "--patch", ids[1][:12], "--out",
                              tmp_path / "q", "--json"))
    assert pulled["patch_id"] == ids[1]
    line = one_error_line(zoedge("pull", "--server", url, "--token", token, "--out", tmp_path / "r"))
    assert "--patch ID or --latest-global" in line
    # another device's patch is not found by prefix either
    _, other = fleet.device("other")
    assert "404" in one_error_line(zoedge("pull", "--server", url, "--token", other, "--patch", ids[0][:12],
                                          "--out", tmp_path / "s"))


def test_bundle_pull_by_prefix_gives_the_published_bundle(fleet, tmp_path):
    _, token = fleet.device("puller")
    out = tmp_path / "b"
    r = last_json(zoedge("bundle", "pull", fleet.bundle_id[:8], "--server", fleet.url, "--token", token, "--out", out,
                         "--json"))
    assert r["bundle_id"] == fleet.bundle_id
    assert Manifest.load(out).files == Manifest.load(fleet.bundle_dir).files
    Bundle.open(out)  # every file against the manifest
    assert stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055  # readable by others, as an ordinary directory
    line = one_error_line(zoedge("bundle", "pull", fleet.bundle_id, "--server", fleet.url, "--token", token,
                                 "--out", out))
    assert "not an empty directory" in line
    assert "404" in one_error_line(zoedge("bundle", "pull", "ffffffff", "--server", fleet.url, "--token", token,
                                          "--out", tmp_path / "none"))


def test_dashboard_shows_full_ids(fleet, tmp_path):
    _, token = fleet.device("dash")
    with fleet.client(token) as c:
        r = c.push(make_patch(fleet.bundle_dir, tmp_path / "p", run_seed=610, seed=610), "adapter",
                   Outbox(tmp_path / "o"))
    with fleet.http(ADMIN) as http:
        html = http.get("/").text
    assert r["patch_id"] in html and fleet.bundle_id in html


def test_an_ambiguous_prefix_is_refused_and_a_unique_one_found(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        db.add_all([Device(id="abcd1111", name="a", token_hash="1"), Device(id="abcd2222", name="b", token_hash="2")])
        db.commit()
        assert by_id_or_prefix(db, Device, "abcd1", "device").name == "a"
        assert by_id_or_prefix(db, Device, "abcd2222", "device").name == "b"
        assert by_id_or_prefix(db, Device, "abce", "device") is None
        assert by_id_or_prefix(db, Device, "abc", "device") is None  # shorter than 4: no prefix lookup
        with pytest.raises(HTTPException, match="ambiguous"):
            by_id_or_prefix(db, Device, "abcd", "device")
    engine.dispose()


def test_a_patch_pushed_before_its_bundle_is_published_stays_queued(backend, tiny_bert_bundle, tmp_path):
    if backend != "sqlite":
        pytest.skip("runs once, on its own SQLite server")
    live = LiveServer(make_settings(tmp_path / "srv", "sqlite")).start()
    try:
        reg = last_json(zoedge("device", "register", "--server", live.url, "--admin-token", ADMIN, "--name", "early",
                               "--json"))
        box = tmp_path / "box"
        patch = make_patch(tiny_bert_bundle, tmp_path / "p", run_seed=77, seed=77)
        p = zoedge("push", patch, "--server", live.url, "--token", reg["token"], "--format", "trajectory",
                   "--outbox", box)
        line = one_error_line(p)
        assert "(424)" in line and "not published" in line and "zoedge sync" in line, line
        assert len(Outbox(box).entries()) == 1 and not (box / "rejected").exists()
        summary = zoedge("sync", "--server", live.url, "--token", reg["token"], "--outbox", box, "--json")
        assert summary.returncode == 2 and len(Outbox(box).entries()) == 1  # still not published: still queued
        zoedge("bundle", "publish", tiny_bert_bundle, "--server", live.url, "--admin-token", ADMIN, "--json")
        synced = last_json(zoedge("sync", "--server", live.url, "--token", reg["token"], "--outbox", box, "--json"))
        assert len(synced["sent"]) == 1 and synced["queued"] == 0 and not (box / "rejected").exists()
    finally:
        live.stop()
