"""The z stream and optimizer updates a trajectory replay depends on give the bytes measured on aarch64 too.

The digests below were printed by scripts/arm64_probe.py on x86-64 and, identically, in the arm64 rootfs of
scripts/arm64_check.sh (qemu-user; QEMU_CPU cortex-a72, cortex-a76, neoverse-n1 and max), numpy 2.4.6. A
different digest here means this machine's numpy draws other float32 normals or rounds an update otherwise
(another ziggurat, an FMA-contracted build, a new numpy stream): trajectories made elsewhere would not replay
bit-exactly on it, so the server would refuse them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "arm64_probe.py"
MEASURED = {  # scripts/arm64_probe.py 64, on x86_64 and aarch64
    "normals": "a42f23146c05d2e4b551ce00f7caa80b54a070e59290369d0daff944fab0f9ff",
    "zo-sgd": "8b1faa310f7620902a8639b17733b991c9e54448ff80130e73356de55fe43aff",
    "zo-momentum": "498b41177cd1d3d26c9a2df5899b6ee4561d0555ca139b2ca4c12733e8c9397b",
    "zo-adam": "f1c40f16cd34ae0464ba0d71404a615ce79e12741d409a484e036913dce6821c",
}


def _probe():
    spec = importlib.util.spec_from_file_location("arm64_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_normal_stream_matches_the_aarch64_bytes():
    # 4.2M float32 normals over 64 (run_seed, step, i) streams: the ziggurat's wedge test (expf) and its tail
    # (log1pf; |z| > 3.654, 0.026% of draws: about 1,100 here) are covered
    assert _probe().normals_digest(64, 65536) == MEASURED["normals"]


def test_optimizer_updates_match_the_aarch64_bytes():
    probe = _probe()
    got = {opt: probe.updates_digest(opt, 30) for opt in ("zo-sgd", "zo-momentum", "zo-adam")}
    assert got == {k: v for k, v in MEASURED.items() if k != "normals"}
