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

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

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


def directions(run_seed: int, step: int, i: int, shapes: list[tuple[str, tuple[int, ...]]],
               out: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """z_i tensor by tensor; with out, each is written into out(shape) (a reused buffer: the same values)."""
    return seeded_directions([run_seed, step, i], shapes, out)


def seeded_directions(entropy: list[int], shapes: list[tuple[str, tuple[int, ...]]],
                      out: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """The direction of PCG64(SeedSequence(entropy)), tensor by tensor (`directions` and the seed pool's z_j)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    for name, shape in shapes:
        if out is None:
            yield name, rng.standard_normal(shape, dtype=np.float32)
        else:
            yield name, rng.standard_normal(dtype=np.float32, out=out(shape))


class DirectionCache:
    """Regenerates z on demand (MeZO's memory saving) or keeps the current step's z when it is small. With a
    seed pool (runtime/seedpool.py), z of (run_seed, step, i) is the pool's z_j, j = pool.index(run_seed, step, i)."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], keep: bool, pool=None):
        self.shapes = shapes
        self.keep = keep
        self.pool = pool  # None, or an object with entropy(run_seed, step, i) -> the SeedSequence entropy of z
        self._key: tuple[int, int, int] | None = None
        self._z: list[tuple[str, np.ndarray]] = []
        self.scratch = Scratch()  # the perturbations' work buffers (and their regenerated z): never saved

    def __call__(self, run_seed: int, step: int, i: int) -> Iterator[tuple[str, np.ndarray]]:
        if not self.keep:
            return self._directions(run_seed, step, i)
        if self._key != (run_seed, step, i):
            self._z = list(self._directions(run_seed, step, i))
            self._key = (run_seed, step, i)
        return iter(self._z)

    def peek(self, run_seed: int, step: int, i: int,
             out: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """z of (run_seed, step, i) leaving what is kept alone: the kept z when it is that one, else generated
        lazily (into out's buffers when given; each is overwritten by the next)."""
        if self.keep and self._key == (run_seed, step, i):
            return iter(self._z)
        return self._directions(run_seed, step, i, out)

    def streamed(self, run_seed: int, step: int, i: int) -> Iterator[tuple[str, np.ndarray]]:
        """z of (run_seed, step, i) for one pass tensor by tensor: the kept z (kept from here on when keeping),
        else regenerated into one reused buffer of the scratch (each overwritten by the next)."""
        if self.keep:
            return self(run_seed, step, i)
        return self._directions(run_seed, step, i, out=lambda shape: self.scratch("z", shape))

    def _directions(self, run_seed: int, step: int, i: int, out=None) -> Iterator[tuple[str, np.ndarray]]:
        if self.pool is None:
            return directions(run_seed, step, i, self.shapes, out)
        return seeded_directions(self.pool.entropy(run_seed, step, i), self.shapes, out)



class Scratch:
    """Flat work buffers that every step reuses, one per slot, sized to the largest tensor asked for. They hold
    nothing between steps: not optimizer state, never checkpointed or snapshotted."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, np.dtype], np.ndarray] = {}
        self._views: dict[tuple, np.ndarray] = {}  # (slot, shape, dtype) -> a view of the slot's buffer

    def __call__(self, slot: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        view = self._views.get((slot, shape, dtype))
        if view is None:
            view = self._views[(slot, shape, dtype)] = self._view(slot, tuple(shape), np.dtype(dtype))
        return view

    def _view(self, slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape)
        buf = self._bufs.get((slot, dtype))
        if buf is None or buf.size < n:  # grows while the first step meets larger tensors, then never
            buf = self._bufs[(slot, dtype)] = np.empty(n, dtype)
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}  # views of the old buffer
        return buf[:n].reshape(shape)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())


def perturb(tensors: dict[str, np.ndarray], z: Iterator[tuple[str, np.ndarray]], scale: float,
            work: Scratch | None = None) -> None:
    """θ += scale * z, in place (scale is ε, -2ε or ε). scale * z goes to work's buffer, not a new array: the
    same float32 product and sum as `t += s * zi`, so the same bytes."""
    s = np.float32(scale)
    work = Scratch() if work is None else work
    for name, zi in z:
        t = tensors[name]
        t += np.multiply(zi, s, out=work("sz", zi.shape, zi.dtype))


@dataclass
class OptimizerState:
    step: int = 0
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # momentum m_<name>, Adam m_/v_<name>
    scratch: Scratch = field(default_factory=Scratch, repr=False, compare=False)  # not state: never saved

    def nbytes(self) -> int:
        """The optimizer state's bytes (what a checkpoint holds); the scratch is not counted."""
        return sum(b.nbytes for b in self.buffers.values())

    def scratch_nbytes(self) -> int:
        return self.scratch.nbytes()

    def buffer(self, key: str, like: np.ndarray) -> np.ndarray:
        b = self.buffers.get(key)  # not setdefault: its default would be a new zero array every step
        if b is None:
            b = self.buffers[key] = np.zeros_like(like)
        return b


def clip_grads(grads: list[float], clip: float) -> list[float]:
    if clip <= 0:
        return [float(np.float32(g)) for g in grads]
    return [float(np.float32(min(max(g, -clip), clip))) for g in grads]


def update(tensors: dict[str, np.ndarray], state: OptimizerState, cfg: ZOConfig, roles: dict[str, str],
           dirs: DirectionCache, run_seed: int, step: int, grads: list[float], lr: float) -> None:
    """Apply one optimizer step in place from the projected gradients of this step.

    No tensor-sized array is allocated: every intermediate goes to the state's scratch (out= and in-place
    ufuncs), and each tensor is updated as soon as its d = (1/q) Σ g_i z_i is summed (the q direction streams
    are read side by side; each is its own generator, so its z are the same). The float32 operations and their
    order are those of the plain expressions quoted in the comments, so the result is bit-identical to them
    (tests/test_zo_update_exact.py holds the expression form as the reference)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    q = len(grads)
    lr32, wd = np.float32(lr), np.float32(cfg.weight_decay)
    work = state.scratch
    streams = [dirs.peek(run_seed, step, i, out=lambda shape, slot=f"z{i}": work(slot, shape)) for i in range(q)]
    if cfg.optimizer == "zo-sgd" and q == 1:  # t -= lr * (g * z + wd * t), no direction-sum buffer
        g = np.float32(grads[0])
        for name, z in streams[0]:
            t = tensors[name]
            gz = np.multiply(z, g, out=work("d", t.shape, t.dtype))
            if wd and roles.get(name) not in NO_DECAY_ROLES:
                gz += np.multiply(t, wd, out=work("s", t.shape, t.dtype))
            gz *= lr32
            t -= gz
        state.step = step
        return
    if [n for n, _ in dirs.shapes] != list(tensors):
        raise ValueError("the directions must cover these tensors, in their order")
    inv_q = np.float32(1.0 / q)
    g32 = [np.float32(g) * inv_q for g in grads]
    for name, t in tensors.items():
        di = work("d", t.shape, t.dtype)
        s = work("s", t.shape, t.dtype)
        for i, stream in enumerate(streams):  # d = 0 + g_1 z_1 + ... + g_q z_q, left to right
            z = next(stream)[1]
            if i == 0:
                np.multiply(z, g32[0], out=di)
                di += np.float32(0)  # the sum started from a zero buffer: 0 + (-0) is +0
            else:
                di += np.multiply(z, g32[i], out=s)
        if wd and roles.get(name) not in NO_DECAY_ROLES:
            di += np.multiply(t, wd, out=s)  # d += wd * t
        if cfg.optimizer == "zo-sgd":
            di *= lr32  # t -= lr * d
            t -= di
        elif cfg.optimizer == "zo-momentum":
            m = state.buffer(f"m_{name}", t)
            m *= np.float32(cfg.momentum)  # m = momentum * m + d
            m += di
            t -= np.multiply(m, lr32, out=di)  # t -= lr * m
        else:  # zo-adam
            b1, b2 = np.float32(cfg.momentum), np.float32(cfg.beta2)
            m = state.buffer(f"m_{name}", t)
            v = state.buffer(f"v_{name}", t)
            m *= b1  # m = b1 * m + (1 - b1) * d
            m += np.multiply(di, np.float32(1) - b1, out=s)
            v *= b2  # v = b2 * v + ((1 - b2) * d) * d
            np.multiply(di, np.float32(1) - b2, out=s)
            s *= di
            v += s
            k = step  # steps are numbered from 1
            np.divide(m, np.float32(1 - float(b1) ** k), out=di)  # mhat = m / (1 - b1^k)
            di *= lr32  # lr * mhat
            np.divide(v, np.float32(1 - float(b2) ** k), out=s)  # vhat = v / (1 - b2^k)
            np.sqrt(s, out=s)
            s += np.float32(cfg.adam_eps)
            di /= s  # t -= (lr * mhat) / (sqrt(vhat) + adam_eps)
            t -= di
    state.step = step


def perturbation_cycle(tensors: dict[str, np.ndarray], dirs: DirectionCache, run_seed: int, step: int, i: int,
                       eps: float, loss_at=None) -> tuple[float, float]:
    """+εz, loss, -2εz, loss, +εz. With loss_at=None only the arithmetic is done (replay). Nothing tensor-sized
    is allocated once dirs' scratch has met the largest tensor (z kept, or regenerated into the scratch)."""
    perturb(tensors, dirs.streamed(run_seed, step, i), eps, dirs.scratch)
    lp = loss_at() if loss_at else 0.0
    perturb(tensors, dirs.streamed(run_seed, step, i), -2 * eps, dirs.scratch)
    lm = loss_at() if loss_at else 0.0
    perturb(tensors, dirs.streamed(run_seed, step, i), eps, dirs.scratch)
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
