"""Server-side patch sanity (issue 13): non-finite and blown-up tensors are refused at upload with a one-line 400,
norm outliers against the bundle's fleet are refused at upload and at aggregation, and the adapter and trajectory
uploads of one run count once in FedAvg."""

from __future__ import annotations

import numpy as np
import pytest

from patch_factory import make_patch, with_tensors
from server_conftest import ADMIN, LiveServer, make_settings
from zoedge.device.client import FleetClient, FleetError
from zoedge.device.outbox import Outbox
from zoedge.patchdoc import ADAPTER_FILE
from zoedge.runtime.tensors import load_tensors
from zoedge.server.sanity import norm_problem, value_problem
from zoedge.transfer import format_files, pack

RATIO, MIN_PATCHES = 10.0, 3


@pytest.fixture(scope="module")
def srv(tiny_bert_bundle, tmp_path_factory):
    """A private server (the ratio check depends on what the bundle's fleet holds): ratio 10x from 3 patches."""
    settings = make_settings(tmp_path_factory.mktemp("sanity-server"), "sqlite", max_norm_ratio=RATIO,
                             norm_ratio_min_patches=MIN_PATCHES)
    live = LiveServer(settings).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            live.bundle_id = admin.publish_bundle(tiny_bert_bundle)["bundle_id"]
            live.token = admin.register_device("sanity")["token"]
        yield live
    finally:
        live.stop()


def upload(live, patch_dir, fmt="adapter"):
    """POST the patch's archive; the raw response."""
    import httpx

    tar = patch_dir.parent / f"{patch_dir.name}-{fmt}.tar"
    sha, _ = pack(patch_dir, tar, format_files(patch_dir, fmt))
    headers = {"Authorization": f"Bearer {live.token}", "X-Zoedge-Sha256": sha,
               "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        return http.post("/v1/patches", content=tar.read_bytes(), headers=headers)


def aggregate(live, ids):
    import httpx

    with httpx.Client(base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        return http.post(f"/v1/bundles/{live.bundle_id}/aggregate", json={"patch_ids": ids})


def patch_count(live) -> int:
    from sqlalchemy import func, select

    from zoedge.server.models import Patch

    with live.state.sessions() as db:
        return db.scalar(select(func.count()).select_from(Patch))


def scaled_lora_b(factor: float):
    return lambda name, role, a: a if role != "lora_B" else a + np.float32(factor)


def test_blown_up_patch_is_refused_at_upload(srv, tiny_bert_bundle, tmp_path):
    """The issue's MiniLM patch had adapter values up to 4.5e9."""
    before = patch_count(srv)
    p = with_tensors(tiny_bert_bundle, tmp_path / "blown",
                     lambda n, role, a: np.full_like(a, 4.5e9) if role == "lora_B" else a)
    r = upload(srv, p)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("patch refused: tensor '") and "lora_B.weight' has a value of 4.5e+09" in detail, detail
    assert "beyond the server's bound of ±1000 (ZOEDGE_MAX_TENSOR_ABS)" in detail and "\n" not in detail
    # through the client: refused for its content, so moved out of the outbox with the reason
    box = Outbox(tmp_path / "outbox")
    with FleetClient(srv.url, srv.token, retries=0) as c, pytest.raises(FleetError) as e:
        c.push(p, "adapter", box)
    assert e.value.status == 400 and "ZOEDGE_MAX_TENSOR_ABS" in str(e.value)
    assert box.entries() == [] and len(list((box.root / "rejected").glob("*.tar"))) == 1
    assert patch_count(srv) == before


def test_nan_patch_is_refused_at_upload(srv, tiny_bert_bundle, tmp_path):
    before = patch_count(srv)
    p = with_tensors(tiny_bert_bundle, tmp_path / "nan",
                     lambda n, role, a: np.full_like(a, np.nan) if role == "head" else a)
    r = upload(srv, p)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("patch refused: adapter_model.safetensors: tensor '") and "NaN or Inf" in detail
    assert patch_count(srv) == before


def test_norm_outliers_are_refused_once_the_fleet_is_large_enough(srv, tiny_bert_bundle, tmp_path):
    # an outlier while the bundle has fewer than MIN_PATCHES accepted patches: nothing to compare it with
    early = with_tensors(tiny_bert_bundle, tmp_path / "early", scaled_lora_b(5.0))
    r = upload(srv, early)
    assert r.status_code == 201, r.text
    early_id = r.json()["patch_id"]
    honest = []
    for i in range(MIN_PATCHES):
        r = upload(srv, make_patch(tiny_bert_bundle, tmp_path / f"h{i}", run_seed=100 + i, seed=100 + i))
        assert r.status_code == 201, r.text
        honest.append(r.json()["patch_id"])
    # the same kind of outlier now: refused, naming the tensor and its norm against the fleet median
    late = with_tensors(tiny_bert_bundle, tmp_path / "late", scaled_lora_b(4.0))
    before = patch_count(srv)
    r = upload(srv, late)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("patch refused: tensor '") and "lora_B" in detail, detail
    assert "x the median" in detail and f"(limit {RATIO:g}x, ZOEDGE_MAX_NORM_RATIO)" in detail
    assert patch_count(srv) == before
    # aggregation refuses the early outlier, naming it; the honest patches average fine
    r = aggregate(srv, [honest[0], early_id])
    assert r.status_code == 400 and r.json()["detail"].startswith(f"aggregate: patch {early_id} refused: tensor")
    r = aggregate(srv, honest[:2])
    assert r.status_code == 201, r.text


def test_adapter_and_trajectory_of_one_run_count_once(srv, tiny_bert_bundle, tmp_path):
    p = make_patch(tiny_bert_bundle, tmp_path / "run", run_seed=200, seed=200, examples=40)
    ids = []
    for fmt in ("adapter", "trajectory"):
        r = upload(srv, p, fmt)
        assert r.status_code == 201, r.text
        ids.append(r.json()["patch_id"])
    other = make_patch(tiny_bert_bundle, tmp_path / "other", run_seed=201, seed=201, examples=60)
    r = upload(srv, other)
    assert r.status_code == 201, r.text
    ids.append(r.json()["patch_id"])
    r = aggregate(srv, ids)
    assert r.status_code == 201, r.text
    g = r.json()
    assert g["examples"] == 100 and g["metrics"] == {"duplicates": {ids[1]: ids[0]}} and g["parent_ids"] == ids
    with FleetClient(srv.url, srv.token) as c:
        c.pull(g["patch_id"], tmp_path / "g")
    tg, ta, tb = (load_tensors(d / ADAPTER_FILE) for d in (tmp_path / "g", p, other))
    for k in ta:
        expected = np.average(np.stack([ta[k], tb[k]]).astype(np.float64), axis=0, weights=[40, 60])
        np.testing.assert_allclose(tg[k], expected, rtol=1e-6, atol=1e-9)


def test_bounds_off_and_honest_spread_pass():
    a = {"w": np.full(4, 5e3, np.float32)}
    assert value_problem(a, 0) is None and "5e+03" in value_problem(a, 1e3)
    fleet = [{"w": 1.0}, {"w": 2.0}, {"w": 3.0}]
    assert norm_problem({"w": 150.0}, fleet, 100.0, 3) is None  # 75x the median: within the default 100x
    assert "75x the median 2" in norm_problem({"w": 150.0}, fleet, 10.0, 3)
    assert norm_problem({"w": 1e9}, fleet, 10.0, 4) is None  # too few patches yet
    assert norm_problem({"w": 1e9}, [{"w": 0.0}] * 5, 10.0, 3) is None  # a tensor nobody moved: no ratio
