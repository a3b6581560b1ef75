"""Flower interop without processes (the default run; tests/test_flower.py runs a real SuperLink): what travels
in Flower's records, and a device's checks on the global it is sent."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from conftest import REPO
from zoedge.errors import ZoedgeError
from zoedge.patchdoc import ADAPTER_FILE
from zoedge.flower import records
from zoedge.flower.client_app import Device, global_patch
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.patch import replay_patch
from zoedge.runtime.seedpool import pool_id
from zoedge.runtime.tensors import tensor_digest

K = 64


@pytest.fixture(scope="module")
def bundle(tiny_bert_bundle):
    return Bundle.open(tiny_bert_bundle)


def a_global(bundle: Bundle) -> tuple[np.ndarray, dict]:
    c = np.zeros(K, np.float32)
    c[[3, 17, 40]] = [1e-3, -2e-3, 5e-4]
    head = next(t for t in bundle.manifest.trainables if t.role == "head")
    return c, {head.name: np.full(head.shape, 0.25, np.float32)}


def test_a_seed_pool_record_round_trips_and_refuses_what_does_not_fit(bundle):
    c, start = a_global(bundle)
    got_c, got_start = records.read_seed_pool(records.seed_pool_record(c, start), bundle, K, "test")
    assert np.array_equal(got_c, c) and sorted(got_start) == sorted(start)
    assert all(np.array_equal(got_start[n], start[n]) for n in start)
    with pytest.raises(ZoedgeError, match="must hold 32 finite float32"):
        records.read_seed_pool(records.seed_pool_record(c, start), bundle, 32, "test")
    with pytest.raises(ZoedgeError, match="no start tensor"):
        records.read_seed_pool(records.seed_pool_record(c, {"not.a.trainable": np.ones(3, np.float32)}),
                               bundle, K, "test")


def test_a_device_rebuilds_the_global_and_refuses_another_digest(bundle, tmp_path):
    c, start = a_global(bundle)
    server = records.write_seed_pool_patch(tmp_path / "server", bundle, c, start, None, kind="global", version=1)
    assert tensor_digest(replay_patch(tmp_path / "server", bundle.path)) == server.adapter_sha256
    device = Device(bundle, tmp_path / "data.tsv", None, tmp_path / "work")

    def message(**config) -> RecordDict:
        cfg = {"mode": "seed-pool", "seed-pool-id": pool_id(bundle.manifest), "seed-pool-k": K,
               "adapter-sha256": server.adapter_sha256, "server-round": 1, **config}
        return RecordDict({records.ARRAYS: records.seed_pool_record(c, start), records.CONFIG: ConfigRecord(cfg)})

    doc, moved = global_patch(device, message(), tmp_path / "device", "round 1")
    assert moved and doc.adapter_sha256 == server.adapter_sha256
    assert (tmp_path / "device" / ADAPTER_FILE).read_bytes() == \
        (tmp_path / "server" / ADAPTER_FILE).read_bytes()
    with pytest.raises(ZoedgeError, match="refused"):
        global_patch(device, message(**{"adapter-sha256": "0" * 64}), tmp_path / "d2", "round 1")
    with pytest.raises(ZoedgeError, match="not this bundle's pool"):
        global_patch(device, message(**{"seed-pool-id": 12345}), tmp_path / "d3", "round 1")
    with pytest.raises(ZoedgeError, match="unknown mode"):
        global_patch(device, message(mode="fedprox"), tmp_path / "d4", "round 1")


def test_the_client_app_imports_no_torch():
    code = ("import sys, zoedge.flower.client_app; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'fastapi') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
