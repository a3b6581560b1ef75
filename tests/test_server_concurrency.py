"""50 concurrent pushes over loopback: none lost, none duplicated (plus concurrent re-sends of one archive)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from patch_factory import make_patch
from server_conftest import backend, fleet  # noqa: F401
from zoedge.device.outbox import Outbox

N_PATCHES, N_DEVICES = 50, 5


def test_fifty_concurrent_pushes(fleet, tmp_path):
    devices = [fleet.device(f"c{i}") for i in range(N_DEVICES)]
    jobs = []
    for i in range(N_PATCHES):
        device_id, token = devices[i % N_DEVICES]
        patch = make_patch(fleet.bundle_dir, tmp_path / f"p{i}", steps=1, run_seed=1000 + i, seed=1000 + i)
        jobs.append((device_id, token, patch, "trajectory" if i % 2 else "adapter", tmp_path / f"o{i}"))
    jobs += [jobs[0][:4] + (tmp_path / f"dup{k}",) for k in range(5)]  # the same archive five more times at once

    def push(job):
        device_id, token, patch, fmt, outbox = job
        with fleet.client(token, retries=5) as c:
            return device_id, c.push(patch, fmt, Outbox(outbox))

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(push, jobs))
    ids = [r["patch_id"] for _, r in results]
    assert len(set(ids)) == N_PATCHES and ids[N_PATCHES:] == [ids[0]] * 5
    with fleet.admin() as admin:
        for device_id, _ in devices:
            stored = admin.list_patches(device_id=device_id)
            assert len(stored) == N_PATCHES // N_DEVICES
            assert {p["patch_id"] for p in stored} == {r["patch_id"] for d, r in results if d == device_id}
            assert len({p["sha256"] for p in stored}) == len(stored)


def test_concurrent_pushes_through_one_outbox_do_not_race(fleet, tmp_path):
    _, token = fleet.device("shared-outbox")
    patch = make_patch(fleet.bundle_dir, tmp_path / "p", steps=1, run_seed=2000, seed=2000)

    def push(_):
        with fleet.client(token) as c:
            return c.push(patch, "adapter", Outbox(tmp_path / "box"))["patch_id"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(push, range(6)))
    assert len(set(ids)) == 1 and Outbox(tmp_path / "box").entries() == []
