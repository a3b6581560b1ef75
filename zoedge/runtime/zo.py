"""Zeroth-order estimation and updates on named float32 tensors (numpy only).

One step of MeZO / n-SPSA with q perturbations:
    for i in 1..q:  z_i = Z(run_seed, step, i)
        θ += εz_i; L+ = loss(θ); θ -= 2εz_i; L- = loss(θ); θ += εz_i      (in place)
        g_i = (L+ - L-) / 2ε                                               (the projected gradient)
    update θ with d = (1/q) Σ g_i z_i through the optimizer (SGD / momentum / Adam) and weight decay.

Everything the update needs is (run_seed, step, g_1..g_q, lr), so a run is replayed exactly from its
trajectory: `replay` performs the same float32 operations in the same order, including the in-place
perturbation round-off. z comes from numpy's PCG64 seeded by SeedSequence([run_seed, step, i]) and
`standard_normal(dtype=float32)`: a pinned, platform-independent stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

GENERATOR = "numpy.PCG64(SeedSequence([run_seed, step, i])).standard_normal(float32)"
OPTIMIZERS = ("zo-sgd", "zo-momentum", "zo-adam")
NO_DECAY_ROLES = ("bias", "norm")


@dataclass
class ZOConfig:
    optimizer: str = "zo-sgd"
    eps: float = 1e-3
    perturbations: int = 1  # q
    weight_decay: float = 0.0
    momentum: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip: float = 0.0  # clip |g| to this value; 0 = off
    inplace: bool = True  # perturbation applied to θ itself (sequential) rather than to copies (batched)
    roles: list[str] | None = None  # perturb / update only trainables with these roles (None: all)
    generator: str = GENERATOR

    def to_dict(self) -> dict:
        return asdict(self)

    def select(self, tensors: dict[str, np.ndarray], roles: dict[str, str]) -> dict[str, np.ndarray]:
        """The tensors ZO moves (same array objects); the others stay fixed inputs."""
        if self.roles is None:
            return tensors
        return {k: v for k, v in tensors.items() if roles.get(k) in self.roles}


def directions(run_seed: int, step: int, i: int, shapes: list[tuple[str, tuple[int, ...]]]) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run_seed, step, i])))
    for name, shape in shapes:
        yield name, rng.standard_normal(shape, dtype=np.float32)


class DirectionCache:
    """Regenerates z on demand (MeZO's memory saving) or keeps the current step's z when it is small."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], keep: bool):
        self.shapes = shapes
        self.keep = keep
        self._key: tuple[int, int, int] | None = None
        self._z: list[tuple[str, np.ndarray]] = []

    def __call__(self, run_seed: int, step: int, i: int) -> Iterator[tuple[str, np.ndarray]]:
        if not self.keep:
            return directions(run_seed, step, i, self.shapes)
        if self._key != (run_seed, step, i):
            self._z = list(directions(run_seed, step, i, self.shapes))
            self._key = (run_seed, step, i)
        return iter(self._z)


def perturb(tensors: dict[str, np.ndarray], z: Iterator[tuple[str, np.ndarray]], scale: float) -> None:
    """θ += scale * z, in place (scale is ε, -2ε or ε)."""
    s = np.float32(scale)
    for name, zi in z:
        t = tensors[name]
        t += s * zi


@dataclass
class OptimizerState:
    step: int = 0
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # momentum m_<name>, Adam m_/v_<name>

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


def clip_grads(grads: list[float], clip: float) -> list[float]:
    if clip <= 0:
        return [float(np.float32(g)) for g in grads]
    return [float(np.float32(min(max(g, -clip), clip))) for g in grads]


def update(tensors: dict[str, np.ndarray], state: OptimizerState, cfg: ZOConfig, roles: dict[str, str],
           dirs: DirectionCache, run_seed: int, step: int, grads: list[float], lr: float) -> None:
    """Apply one optimizer step in place from the projected gradients of this step."""
    q = len(grads)
    lr32, wd = np.float32(lr), np.float32(cfg.weight_decay)
    # d = (1/q) Σ g_i z_i, accumulated per tensor; for q = 1 no buffer is needed with SGD.
    if cfg.optimizer == "zo-sgd" and q == 1:
        g = np.float32(grads[0])
        for name, z in dirs(run_seed, step, 0):
            t = tensors[name]
            if wd and roles.get(name) not in NO_DECAY_ROLES:
                t -= lr32 * (g * z + wd * t)
            else:
                t -= lr32 * (g * z)
        state.step = step
        return
    d = {name: np.zeros_like(t) for name, t in tensors.items()}
    inv_q = np.float32(1.0 / q)
    for i, g in enumerate(grads):
        g32 = np.float32(g) * inv_q
        for name, z in dirs(run_seed, step, i):
            d[name] += g32 * z
    for name, t in tensors.items():
        di = d[name]
        if wd and roles.get(name) not in NO_DECAY_ROLES:
            di += wd * t
        if cfg.optimizer == "zo-sgd":
            t -= lr32 * di
        elif cfg.optimizer == "zo-momentum":
            m = state.buffers.setdefault(f"m_{name}", np.zeros_like(t))
            m *= np.float32(cfg.momentum)
            m += di
            t -= lr32 * m
        elif cfg.optimizer == "zo-adam":
            b1, b2 = np.float32(cfg.momentum), np.float32(cfg.beta2)
            m = state.buffers.setdefault(f"m_{name}", np.zeros_like(t))
            v = state.buffers.setdefault(f"v_{name}", np.zeros_like(t))
            m *= b1
            m += (np.float32(1) - b1) * di
            v *= b2
            v += (np.float32(1) - b2) * di * di
            k = step  # steps are numbered from 1
            mhat = m / np.float32(1 - float(b1) ** k)
            vhat = v / np.float32(1 - float(b2) ** k)
            t -= lr32 * mhat / (np.sqrt(vhat) + np.float32(cfg.adam_eps))
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    state.step = step


def perturbation_cycle(tensors: dict[str, np.ndarray], dirs: DirectionCache, run_seed: int, step: int, i: int,
                       eps: float, loss_at=None) -> tuple[float, float]:
    """+εz, loss, -2εz, loss, +εz. With loss_at=None only the arithmetic is done (replay)."""
    perturb(tensors, dirs(run_seed, step, i), eps)
    lp = loss_at() if loss_at else 0.0
    perturb(tensors, dirs(run_seed, step, i), -2 * eps)
    lm = loss_at() if loss_at else 0.0
    perturb(tensors, dirs(run_seed, step, i), eps)
    return lp, lm


def replay(tensors: dict[str, np.ndarray], cfg: ZOConfig, roles: dict[str, str], run_seed: int,
           trajectory: np.ndarray, first_step: int = 1) -> OptimizerState:
    """Rebuild the trained tensors from the starting tensors and a trajectory of rows [g_1..g_q, lr]."""
    shapes = [(n, tuple(t.shape)) for n, t in tensors.items()]
    dirs = DirectionCache(shapes, keep=False)
    state = OptimizerState()
    q = cfg.perturbations
    for k, row in enumerate(np.asarray(trajectory, dtype=np.float32)):
        step = first_step + k
        if cfg.inplace:
            for i in range(q):
                perturbation_cycle(tensors, dirs, run_seed, step, i, cfg.eps)
        update(tensors, state, cfg, roles, dirs, run_seed, step, [float(g) for g in row[:q]], float(row[q]))
    return state
