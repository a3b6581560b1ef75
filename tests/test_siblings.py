"""Sibling bundles (issue 16): exports of one base with one trainable selection share a lineage and a sibling key
whatever their quantization or format; the server stores a patch once and serves it to every sibling, and refuses
it (422, one line) for a bundle whose trainables differ."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import export_tiny
from patch_factory import make_patch
from server_conftest import ADMIN, Fleet, LiveServer, make_settings
from zoedge.device.client import FleetClient, FleetError
from zoedge.device.outbox import Outbox
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest, trainables_sha256
from zoedge.runtime.patch import load_patch
from zoedge.transfer import format_files, pack


@pytest.fixture(scope="module")
def exports(tiny_bert_bundle, tmp_path_factory) -> dict:
    """tiny-bert as the fp32 fixture, int8, fp16, ORT format, and with LoRA r=4 (other trainables)."""
    root = tmp_path_factory.mktemp("siblings")
    out = {"fp32": tiny_bert_bundle}
    for name, extra in (("int8", ("--quant", "int8")), ("fp16", ("--quant", "fp16")), ("ort", ("--format", "ort")),
                        ("r4", ("--lora-rank", 4))):
        out[name] = export_tiny(root / name, "tiny-bert", *extra)
    return out


# ---- the manifest ------------------------------------------------------------------------------------------------
def test_quantizations_and_formats_are_siblings_another_rank_is_not(exports):
    m = {k: Manifest.load(d) for k, d in exports.items()}
    assert len({x.bundle_id for x in m.values()}) == len(m)
    fp32 = m["fp32"]
    assert fp32.lineage.model_id == "tiny-bert" and fp32.lineage.base_sha256 == fp32.base_sha256
    assert fp32.lineage.trainables_sha256 == trainables_sha256(fp32.trainables)
    for name in ("int8", "fp16", "ort"):
        assert m[name].lineage == fp32.lineage, name
        assert m[name].sibling_key == fp32.sibling_key, name
    assert (m["int8"].quantization, m["fp16"].quantization, m["ort"].model_format) == ("int8", "fp16", "ort")
    assert m["r4"].lineage.base_sha256 == fp32.base_sha256  # same base ...
    assert m["r4"].lineage.trainables_sha256 != fp32.lineage.trainables_sha256  # ... other trainables
    assert m["r4"].sibling_key != fp32.sibling_key


def test_the_key_follows_base_trainables_initial_tensors_and_labels(exports):
    m = Manifest.load(exports["fp32"])
    d = m.to_dict()
    del d["lineage"]
    changed = [Manifest.from_dict({**d, "base_sha256": "0" * 64}),
               Manifest.from_dict({**d, "initial_sha256": "1" * 64}),
               Manifest.from_dict({**d, "labels": ["bad", "good"]}),
               Manifest.from_dict({**d, "trainables": d["trainables"][1:]})]
    assert len({m.sibling_key, *(c.sibling_key for c in changed)}) == 5
    same = Manifest.from_dict({**d, "quantization": "int8-static", "target": "phone", "copies": 4})
    assert same.sibling_key == m.sibling_key


def test_a_manifest_without_lineage_gets_one_derived(exports):
    m = Manifest.load(exports["fp32"])
    d = m.to_dict()
    del d["lineage"]
    old = Manifest.from_dict(d)
    assert old.lineage == dataclasses.replace(m.lineage, revision="")
    assert old.sibling_key == m.sibling_key


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["lineage"].update(base_sha256="f" * 64), "lineage.base_sha256"),
    (lambda d: d["lineage"].update(trainables_sha256="f" * 64), "lineage.trainables_sha256"),
    (lambda d: d["trainables"][0].update(dtype="float16"), "lineage.trainables_sha256"),
    (lambda d: d["lineage"].update(revision=3), "lineage must be"),
    (lambda d: d["lineage"].pop("model_id"), "malformed"),
])
def test_a_lineage_that_disagrees_with_the_manifest_is_refused(exports, edit, message):
    d = Manifest.load(exports["fp32"]).to_dict()
    edit(d)
    with pytest.raises(ZoedgeError, match=message):
        Manifest.from_dict(d)


def test_a_patch_of_the_int8_bundle_loads_on_its_siblings_not_on_another_rank(exports, tmp_path):
    patch = make_patch(exports["int8"], tmp_path / "p", run_seed=3, seed=3)
    for name in ("fp32", "fp16", "ort"):
        load_patch(patch, Manifest.load(exports[name]))
    with pytest.raises(ZoedgeError, match="other initial trainables|other tensors"):
        load_patch(patch, Manifest.load(exports["r4"]))


# ---- the server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    """A server of its own (listing by bundle spans siblings, which would mix into the shared fleet's tests) with
    the fp32, int8 and r4 bundles published, in that order; fp16 and ort stay unpublished."""
    live = LiveServer(make_settings(tmp_path_factory.mktemp("sibling-server"), "sqlite")).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            ids = {k: admin.publish_bundle(exports[k])["bundle_id"] for k in ("fp32", "int8", "r4")}
        yield Fleet(live, exports["fp32"], ids["fp32"]), ids
    finally:
        live.stop()


def test_the_server_lists_a_bundles_siblings(server):
    fleet, ids = server
    with fleet.admin() as admin:
        assert [b["bundle_id"] for b in admin.siblings(ids["int8"])] == [ids["fp32"], ids["int8"]]
        assert [b["bundle_id"] for b in admin.siblings(ids["r4"])] == [ids["r4"]]
        keys = {k: admin.get_bundle(i)["sibling_key"] for k, i in ids.items()}
    assert keys["fp32"] == keys["int8"] != keys["r4"]
    assert keys["fp32"] == Manifest.load(fleet.bundle_dir).sibling_key


def test_a_patch_is_stored_once_and_served_to_its_siblings(server, exports, tmp_path):
    fleet, ids = server
    _, token = fleet.device("phone-int8")
    patch = make_patch(exports["int8"], tmp_path / "p", run_seed=5, seed=5)
    with fleet.client(token) as c:
        r = c.push(patch, "trajectory", Outbox(tmp_path / "o"))  # served complete (the server replays it)
        assert r["bundle_id"] == ids["int8"]
        before = fleet.stored_state()
        again = c.push(patch, "trajectory", Outbox(tmp_path / "o"), bundle=ids["fp32"])  # pushed for a sibling
        assert again["patch_id"] == r["patch_id"] and fleet.stored_state() == before  # stored once
        for sibling in ("fp32", "int8"):
            assert r["patch_id"] in [p["patch_id"] for p in c.list_patches(bundle_id=ids[sibling])], sibling
        assert r["patch_id"] not in [p["patch_id"] for p in c.list_patches(bundle_id=ids["fp32"], siblings=False)]
        assert c.list_patches(bundle_id=ids["r4"]) == []
        c.pull(r["patch_id"], tmp_path / "pulled")
    load_patch(tmp_path / "pulled", Manifest.load(exports["fp16"]))  # and it applies on an unpublished sibling


def test_a_patch_pushed_for_a_sibling_is_stored_for_it(server, exports, tmp_path):
    fleet, ids = server
    _, token = fleet.device("jetson-fp16")
    patch = make_patch(exports["fp16"], tmp_path / "p", run_seed=6, seed=6)  # fp16 is not on the server
    with fleet.client(token) as c:
        r = c.push(patch, "trajectory", Outbox(tmp_path / "o"), bundle=ids["fp32"])
        assert (r["bundle_id"], r["kind"]) == (ids["fp32"], "trajectory")
        plain = make_patch(exports["fp16"], tmp_path / "q", run_seed=7, seed=7)
        r2 = c.push(plain, "adapter", Outbox(tmp_path / "o"))  # no target: a published sibling it fits
        assert r2["bundle_id"] in (ids["fp32"], ids["int8"])


def test_a_patch_is_refused_for_a_bundle_with_other_trainables(server, exports, tmp_path):
    fleet, ids = server
    _, token = fleet.device("pi-r4")
    patch = make_patch(exports["int8"], tmp_path / "p", run_seed=8, seed=8)
    box = Outbox(tmp_path / "o")
    before = fleet.stored_state()
    with fleet.client(token) as c, pytest.raises(FleetError) as e:
        c.push(patch, "adapter", box, bundle=ids["r4"])
    assert e.value.status == 422
    line = str(e.value)
    assert "\n" not in line and "it trains other tensors (10 tensors" in line and "LoRA r=4 on q,v)" in line, line
    assert fleet.stored_state() == before
    assert box.entries() == [] and len(list((box.root / "rejected").glob("*.tar"))) == 1
    archive = tmp_path / "p.tar"
    sha, _ = pack(patch, archive, format_files(patch, "adapter"))
    with fleet.client(token) as c, pytest.raises(FleetError, match="no bundle nope") as e:
        c.upload_archive(archive, sha, "adapter", bundle="nope")
    assert e.value.status == 404 and fleet.stored_state() == before
    with fleet.client(token) as c:  # stored for int8, then the same archive for r4: 409, nothing more stored
        c.push(patch, "adapter", Outbox(tmp_path / "o2"))
        stored = fleet.stored_state()
        with pytest.raises(FleetError, match="no sibling of bundle") as e:
            c.push(patch, "adapter", Outbox(tmp_path / "o3"), bundle=ids["r4"])
        assert e.value.status == 409 and fleet.stored_state() == stored


def test_siblings_share_rounds_and_global_versions(server, exports, tmp_path):
    fleet, ids = server
    (_, a), (_, b) = fleet.device("a-int8"), fleet.device("b-fp32")
    pa = make_patch(exports["int8"], tmp_path / "pa", run_seed=9, seed=9, examples=100)
    pb = make_patch(exports["fp32"], tmp_path / "pb", run_seed=10, seed=10, examples=300)
    pr = make_patch(exports["r4"], tmp_path / "pr", run_seed=11, seed=11)
    with fleet.client(a) as ca, fleet.client(b) as cb:
        ra = ca.push(pa, "adapter", Outbox(tmp_path / "oa"))
        rb = cb.push(pb, "adapter", Outbox(tmp_path / "ob"))
        rr = ca.push(pr, "adapter", Outbox(tmp_path / "oa"))
    assert (ra["bundle_id"], rb["bundle_id"], rr["bundle_id"]) == (ids["int8"], ids["fp32"], ids["r4"])
    with fleet.admin() as admin:
        with pytest.raises(FleetError, match="nor a sibling"):
            admin.aggregate(ids["int8"], [ra["patch_id"], rr["patch_id"]])
        g = admin.aggregate(ids["int8"], [ra["patch_id"], rb["patch_id"]])
        assert (g["bundle_id"], g["examples"]) == (ids["fp32"], 400)  # kept under the first published sibling
        assert admin.latest_global(ids["int8"])["patch_id"] == g["patch_id"]
        g2 = admin.aggregate(ids["fp32"], [rb["patch_id"]])
        assert g2["version"] == g["version"] + 1
    with fleet.client(a) as ca:
        nxt = ca.push(make_patch(exports["int8"], tmp_path / "pn", run_seed=12, seed=12), "adapter",
                      Outbox(tmp_path / "oa"))
        assert nxt["version"] == g2["version"]  # the int8 bundle's round follows the group's global versions
        ca.pull(g["patch_id"], tmp_path / "global")
    load_patch(tmp_path / "global", Manifest.load(exports["int8"]))


def test_auto_aggregation_counts_a_round_across_siblings(exports, tmp_path):
    live = LiveServer(make_settings(tmp_path / "srv", "sqlite", auto_aggregate=2)).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            ids = {k: admin.publish_bundle(exports[k])["bundle_id"] for k in ("fp32", "int8")}
        fleet = Fleet(live, exports["fp32"], ids["fp32"])
        (_, a), (_, b) = fleet.device("a"), fleet.device("b")
        with fleet.client(a) as ca, fleet.client(b) as cb:
            ca.push(make_patch(exports["int8"], tmp_path / "pa", run_seed=1, seed=1), "adapter", Outbox(tmp_path / "a"))
            assert ca.latest_global(ids["int8"]) is None
            cb.push(make_patch(exports["fp32"], tmp_path / "pb", run_seed=2, seed=2), "adapter", Outbox(tmp_path / "b"))
            g = cb.latest_global(ids["int8"])
        assert g is not None and (g["bundle_id"], g["version"], len(g["parent_ids"])) == (ids["fp32"], 1, 2)
    finally:
        live.stop()
