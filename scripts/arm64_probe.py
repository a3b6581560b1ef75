"""Digests of the float32 arithmetic a trajectory replay depends on, printed as one JSON line.

Run on two architectures (scripts/arm64_check.sh runs it in the aarch64 rootfs and on x86): equal digests
mean the z stream (numpy PCG64 + standard_normal(float32): ziggurat, its wedge and tail with expf / log1pf)
and the optimizers' in-place float32 updates give the same bytes there. numpy only, no zoedge import beyond
zoedge.runtime.zo (numpy alone).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys

import numpy as np

from zoedge.runtime.zo import DirectionCache, OptimizerState, ZOConfig, directions, update

SHAPES = [("a", (8, 384)), ("b", (384, 8)), ("head", (2, 384)), ("bias", (2,))]


def normals_digest(n_streams: int, per_stream: int) -> str:
    """sha256 over the z of n_streams seeds (run_seed, step, i), each per_stream float32 values."""
    h = hashlib.sha256()
    for s in range(n_streams):
        for _, z in directions(1234 + s, s, s % 3, [("z", (per_stream,))]):
            h.update(z.tobytes())
    return h.hexdigest()


def updates_digest(optimizer: str, steps: int) -> str:
    """sha256 of tensors after `steps` updates (q = 2, weight decay) of zoedge's optimizer from fixed values."""
    rng = np.random.Generator(np.random.PCG64(7))
    tensors = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in SHAPES}
    cfg = ZOConfig(optimizer=optimizer, perturbations=2, weight_decay=0.01)
    state, dirs = OptimizerState(), DirectionCache([(k, v.shape) for k, v in tensors.items()], keep=False)
    roles = {"a": "lora_A", "b": "lora_B", "head": "head", "bias": "bias"}
    for step in range(1, steps + 1):
        grads = [float(np.float32(np.sin(step * (i + 1.7)) * 3)) for i in range(2)]
        update(tensors, state, cfg, roles, dirs, 99, step, grads, 1e-3)
    h = hashlib.sha256()
    for k in tensors:
        h.update(tensors[k].tobytes())
    return h.hexdigest()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    out = {"machine": platform.machine(), "numpy": np.__version__,
           "normals": normals_digest(n, 65536), "normals_values": n * 65536}
    for opt in ("zo-sgd", "zo-momentum", "zo-adam"):
        out[opt] = updates_digest(opt, 30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
