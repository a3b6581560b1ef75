"""Per-step cost of zo.update (issue 14): milliseconds per update and tracemalloc's peak bytes per update.

    .venv/bin/python scripts/profile_zo_update.py [--before c91be58] [--steps 200] [--weight-decay 0.01]

Tensor sets are LoRA r8 on q,v: MiniLM-L6 (6 layers x {q,v} x A 8x384, B 384x8, plus the classifier head 2x384
and its bias) and SmolLM2-135M (30 layers; q: A 8x576, B 576x8; v: A 8x576, B 192x8, its 3 KV heads x 64).
The cache of z is in the state the trainer leaves it in before an update: kept (these sets are far below
KEEP_Z_BYTES), holding the last perturbation's z, so an update with q > 1 regenerates the other q - 1.

--before REV also loads zoedge/runtime/zo.py as it was at REV (git show) and measures both, interleaved
round by round so that a loaded machine slows both alike. Timings are medians over the rounds' per-step
means; the allocation figure is exact (the largest peak over the measured steps, above what was live before).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zoedge.runtime import zo  # noqa: E402

SEED = 1234


def lora(prefix: str, d_in: int, d_out: int, r: int = 8) -> dict[str, tuple[tuple[int, ...], str]]:
    return {f"{prefix}.lora_A.weight": ((r, d_in), "lora_A"), f"{prefix}.lora_B.weight": ((d_out, r), "lora_B")}


def tensor_sets() -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    minilm: dict = {}
    for layer in range(6):
        for mod in ("query", "value"):
            minilm.update(lora(f"encoder.layer.{layer}.attention.self.{mod}", 384, 384))
    minilm["classifier.weight"] = ((2, 384), "head")
    minilm["classifier.bias"] = ((2,), "bias")
    smollm: dict = {}
    for layer in range(30):
        smollm.update(lora(f"model.layers.{layer}.self_attn.q_proj", 576, 576))
        smollm.update(lora(f"model.layers.{layer}.self_attn.v_proj", 576, 192))
    return {"MiniLM-L6 LoRA r8 q,v + head": minilm, "SmolLM2-135M LoRA r8 q,v": smollm}


def load_at(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:zoedge/runtime/zo.py"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"zo_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:zoedge/runtime/zo.py", "exec"), mod.__dict__)
    return mod


class Bench:
    """One implementation on one tensor set with one optimizer and q; state carries over between rounds."""

    def __init__(self, impl: types.ModuleType, spec: dict, optimizer: str, q: int, wd: float):
        rng = np.random.default_rng(0)
        self.impl = impl
        self.tensors = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, (s, _) in spec.items()}
        self.roles = {n: role for n, (_, role) in spec.items()}
        self.cfg = impl.ZOConfig(optimizer=optimizer, perturbations=q, weight_decay=wd)
        self.dirs = impl.DirectionCache([(n, t.shape) for n, t in self.tensors.items()], keep=True)
        self.state = impl.OptimizerState()
        self.grads = [float(g) for g in rng.standard_normal(q)]
        self.step = 0

    def prime(self) -> int:
        """The next step, with the z cache as the perturbation cycles leave it (outside the measurement)."""
        self.step += 1
        list(self.dirs(SEED, self.step, self.cfg.perturbations - 1))
        return self.step

    def one(self, step: int) -> None:
        self.impl.update(self.tensors, self.state, self.cfg, self.roles, self.dirs, SEED, step, self.grads, 1e-4)

    def time_steps(self, n: int) -> float:
        total = 0.0
        for _ in range(n):
            step = self.prime()
            t0 = time.perf_counter()
            self.one(step)
            total += time.perf_counter() - t0
        return 1e3 * total / n

    def peak_bytes(self, n: int) -> int:
        peak = 0
        tracemalloc.start()
        for _ in range(n):
            step = self.prime()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            self.one(step)
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
        return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="a git revision whose zo.py to measure alongside the working tree's")
    ap.add_argument("--steps", type=int, default=200, help="updates per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    args = ap.parse_args()
    impls = {"before": load_at(args.before)} if args.before else {}
    impls["after"] = zo
    print(f"numpy {np.__version__}, weight decay {args.weight_decay}, {args.steps} updates x {args.rounds} rounds")
    cols = " | ".join(f"{k} ms/update" for k in impls) + " | " + " | ".join(f"{k} peak bytes/update" for k in impls)
    print(f"\n| tensors | optimizer | q | {cols} |\n|" + "---|" * (3 + 2 * len(impls)))
    for set_name, spec in tensor_sets().items():
        for optimizer in zo.OPTIMIZERS:
            for q in (1, 4):
                benches = {k: Bench(m, spec, optimizer, q, args.weight_decay) for k, m in impls.items()}
                for b in benches.values():
                    b.time_steps(5)  # warm-up: the optimizer buffers and scratch exist from here on
                times: dict[str, list[float]] = {k: [] for k in benches}
                for _ in range(args.rounds):
                    for k, b in benches.items():
                        times[k].append(b.time_steps(args.steps))
                peaks = {k: b.peak_bytes(10) for k, b in benches.items()}
                ms = " | ".join(f"{statistics.median(times[k]):.3f}" for k in benches)
                pk = " | ".join(f"{peaks[k]:,}" for k in benches)
                print(f"| {set_name} | {optimizer} | {q} | {ms} | {pk} |", flush=True)
    for set_name, spec in tensor_sets().items():
        n = sum(int(np.prod(s)) * 4 for s, _ in spec.values())
        print(f"\n{set_name}: {len(spec)} tensors, {n:,} bytes moved")


if __name__ == "__main__":
    main()
