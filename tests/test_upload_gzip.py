"""A seed-pool (coefficients) upload travels as a deterministic gzipped tar (its plain tar pads ~8 KB of files to
20 KB); the server accepts it, and a plain-tar coefficients upload (older clients) still works."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from runtime_helpers import quiet, write_toy_split
from server_conftest import backend, fleet  # noqa: F401
from zoedge.constants import SEED_POOL_K
from zoedge.device.outbox import Outbox
from zoedge.runtime.patch import ADAPTER_FILE
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import TrainConfig, train
from zoedge.transfer import SHA256_HEADER, format_files, pack, unpack


@pytest.fixture(scope="module")
def patches(tiny_bert_bundle, tmp_path_factory):
    """Two seed-pool runs (one with a head start), so the old-format upload is not a duplicate of the new one."""
    root = tmp_path_factory.mktemp("gz")
    toy = write_toy_split(root, 120, 30)
    out = []
    for seed, head in ((3, "lp"), (4, "none")):
        cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, eps=1e-2, head_init=head, lp_examples=120, keep="last",
                          checkpoint_every=0, seed=seed, seed_pool=SEED_POOL_K)
        train(tiny_bert_bundle, toy[0], root / f"p{seed}", cfg, log=quiet)
        out.append(root / f"p{seed}")
    return out


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
