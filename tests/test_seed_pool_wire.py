"""What a seed-pool patch costs on the wire: its upload travels as a deterministic gzipped tar (a plain tar pads
~8 KB of files to 20 KB), which the server accepts beside plain-tar uploads of older clients; a device pulls a
seed-pool global as its coefficients alone (GET /v1/patches/{id}/archive?format=coefficients) and rebuilds it."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from runtime_helpers import quiet, write_toy_split
from server_conftest import backend, fleet  # noqa: F401
from zoedge.constants import SEED_POOL_K
from zoedge.device.outbox import Outbox
from zoedge.device.client import FleetError
from zoedge.runtime.patch import ADAPTER_FILE, complete_patch_dir
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import TrainConfig, train
from zoedge.transfer import SHA256_HEADER, format_files, pack, unpack


def seed_pool_runs(bundle, root, seeds: tuple[int, ...]) -> list:
    """Seed-pool runs of a few steps (the first with a head start, so its start travels), one per seed."""
    toy = write_toy_split(root, 120, 30)
    out = []
    for i, seed in enumerate(seeds):
        cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, eps=1e-2, head_init="lp" if i == 0 else "none",
                          lp_examples=120, keep="last", checkpoint_every=0, seed=seed, seed_pool=SEED_POOL_K)
        train(bundle, toy[0], root / f"p{seed}", cfg, log=quiet)
        out.append(root / f"p{seed}")
    return out


@pytest.fixture(scope="module")
def patches(tiny_bert_bundle, tmp_path_factory):
    """Two runs, so the old-format upload is not a duplicate of the new one."""
    return seed_pool_runs(tiny_bert_bundle, tmp_path_factory.mktemp("gz"), (3, 4))


def test_the_coefficients_upload_is_a_deterministic_gzip_of_the_same_files(patches, tmp_path):
    names = format_files(patches[0], "coefficients")
    plain = pack(patches[0], tmp_path / "plain.tar", names)
    entry = Outbox(tmp_path / "box").enqueue_patch(patches[0], "coefficients")
    archive = Outbox(tmp_path / "box").archive_path(entry.sha256)
    assert archive.read_bytes()[:2] == b"\x1f\x8b" and entry.bytes < plain[1] // 2  # 20,480 -> a few KB
    assert gzip.decompress(archive.read_bytes()) == (tmp_path / "plain.tar").read_bytes()
    again = Outbox(tmp_path / "box2").enqueue_patch(patches[0], "coefficients")
    assert again.sha256 == entry.sha256  # mtime 0, no name in the gzip header: idempotent uploads stay so
    assert sorted(unpack(archive, tmp_path / "x")) == sorted(names)
    assert Outbox(tmp_path / "box3").enqueue_patch(patches[0], "adapter").bytes % 10240 == 0  # others: plain tar


def test_the_server_accepts_the_gzipped_upload_and_an_old_plain_one(fleet, patches, tmp_path):
    _, token = fleet.device("gz")
    with fleet.client(token) as c:
        new = c.push(patches[0], "coefficients", Outbox(tmp_path / "o"))
    assert new["kind"] == "coefficients" and new["bytes"] < 10240
    sha, size = pack(patches[1], tmp_path / "old.tar", format_files(patches[1], "coefficients"))  # as before
    with fleet.http(token) as http:
        r = http.post("/v1/patches", content=(tmp_path / "old.tar").read_bytes(),
                      headers={SHA256_HEADER: sha, "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert (r.json()["kind"], r.json()["bytes"]) == ("coefficients", size)
        for got, patch in ((new, patches[0]), (r.json(), patches[1])):  # both rebuilt to the device's adapter
            a = http.get(f"/v1/patches/{got['patch_id']}/adapter")
            (tmp_path / "a.safetensors").write_bytes(a.content)
            got_t, want_t = load_tensors(tmp_path / "a.safetensors"), load_tensors(patch / ADAPTER_FILE)
            assert sorted(got_t) == sorted(want_t) and all(np.array_equal(got_t[k], want_t[k]) for k in want_t)


def test_a_device_pulls_a_seed_pool_global_as_coefficients_and_rebuilds_it(fleet, tiny_bert_bundle, tmp_path):
    """`pull(..., "coefficients")`: a few KB instead of the stored archive with its adapter; the device's rebuild
    is the server's adapter, bit for bit. A patch without coefficients cannot be pulled that way."""
    _, token = fleet.device("gz-pull")
    patches = seed_pool_runs(tiny_bert_bundle, tmp_path, (5, 6))
    with fleet.client(token) as c:
        ids = [c.push(p, "coefficients", Outbox(tmp_path / f"o{i}"))["patch_id"] for i, p in enumerate(patches)]
    with fleet.admin() as admin:
        g = admin.aggregate(fleet.bundle_id, ids)
    with fleet.client(token) as c:
        c.pull(g["patch_id"], tmp_path / "whole")
        c.pull(g["patch_id"], tmp_path / "lean", "coefficients")
    lean = sorted(p.name for p in (tmp_path / "lean").iterdir())
    assert lean == sorted(["patch.json", "coefficients.npy", "start.safetensors"])
    with fleet.http(token) as http:
        r = http.get(f"/v1/patches/{g['patch_id']}/archive", params={"format": "coefficients"})
        assert r.content[:2] == b"\x1f\x8b" and len(r.content) < 10240
        plain = http.get(f"/v1/patches/{g['patch_id']}/archive")
        assert len(r.content) * 2 < len(plain.content)
    complete_patch_dir(tmp_path / "lean", fleet.bundle_dir)
    got, want = load_tensors(tmp_path / "lean" / ADAPTER_FILE), load_tensors(tmp_path / "whole" / ADAPTER_FILE)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_patch_without_coefficients_is_refused_as_coefficients(fleet, tiny_bert_bundle, tmp_path):
    toy = write_toy_split(tmp_path, 60, 10)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, eps=1e-2, head_init="none", keep="last", checkpoint_every=0)
    train(tiny_bert_bundle, toy[0], tmp_path / "plain", cfg, log=quiet)
    _, token = fleet.device("gz-plain")
    with fleet.client(token) as c:
        pid = c.push(tmp_path / "plain", "trajectory", Outbox(tmp_path / "o"))["patch_id"]
        with pytest.raises(FleetError, match="no seed-pool patch"):
            c.pull(pid, tmp_path / "x", "coefficients")
