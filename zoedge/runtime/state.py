"""The whole state of a training run in one object: it is the guard's snapshot, the checkpoint's content and
the resume object, so rolling back and resuming are the same operation (`restore`) and forget nothing.

Everything that decides what the patch will be lives here: the live trainable tensors (the arrays the forward
engine reads, restored in place), the optimizer buffers, the trajectory so far, the best tensors and their step,
the head start, the eval history and the guard's reference losses. Only the guard's own bookkeeping (lr scale,
rollback counts) survives a rollback; that is what makes the retried steps different.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.runtime.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

GUARD_FIELDS = ("lr_scale", "rollbacks", "failed_rollbacks", "fail_step", "fail_count", "hard_steps")  # kept across a rollback


@dataclass
class RunState:
    # identity: a checkpoint resumes only the run that wrote it
    bundle_id: str
    config: dict[str, Any]
    # arrays
    tensors: dict[str, np.ndarray]  # the live trainables (bound zero-copy to the forward engine)
    trajectory: np.ndarray  # (steps, q + 1) float32 rows [g_1..g_q, lr]; rows [:step] are valid
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    start: dict[str, np.ndarray] = field(default_factory=dict)  # the head start (set before step 1)
    best: dict[str, np.ndarray] = field(default_factory=dict)  # tensors at best_step (never mutated in place)
    # progress
    step: int = 0
    batch: int = 0  # examples per step (planned once under --max-memory; part of the trajectory)
    done: bool = False  # finished or stopped early: resuming writes the patch, it does not train on
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_score: float | None = None
    evals_since_best: int = 0
    start_metrics: dict[str, float] | None = None
    lp_metrics: dict[str, float] | None = None
    prompt_template: str | None = None
    prompt_search: list[dict] = field(default_factory=list)
    kept_gain: dict[str, Any] | None = None  # the best step's paired gain over step 0 (finish.gate_kept_step)
    # the guard
    loss_ref: float | None = None  # running mean of the training loss
    loss_floor: float | None = None  # its lowest value: a slow climb cannot raise the blow-up threshold
    lr_scale: float = 1.0
    rollbacks: int = 0
    failed_rollbacks: int = 0  # rollbacks since the run last got past fail_step
    fail_step: int = 0  # the step that last diverged
    fail_count: int = 0  # consecutive loss blow-ups at fail_step
    hard_steps: list[int] = field(default_factory=list)  # steps whose blow-up was taken for a hard batch, for good

    ARRAYS = ("tensors", "trajectory", "optimizer", "start", "best")

    # ---- snapshot / rollback ---------------------------------------------------------------------------
    def snapshot(self) -> "RunState":
        """A deep copy of the mutable parts (best and start are replaced, never mutated, so they are shared)."""
        s = dataclasses.replace(self)
        s.tensors = {k: v.copy() for k, v in self.tensors.items()}
        s.optimizer = {k: v.copy() for k, v in self.optimizer.items()}
        s.trajectory = self.trajectory[:self.step].copy()
        s.history = list(self.history)
        return s

    def restore(self, snap: "RunState") -> None:
        """Become snap again, in place (the forward engine keeps its bindings); guard bookkeeping is kept."""
        for f in dataclasses.fields(self):
            if f.name in GUARD_FIELDS or f.name in ("tensors", "trajectory", "optimizer"):
                continue
            setattr(self, f.name, getattr(snap, f.name))
        for k, v in snap.tensors.items():
            np.copyto(self.tensors[k], v)
        self.optimizer.clear()  # the same dict object: the optimizer state object holds it
        self.optimizer.update({k: v.copy() for k, v in snap.optimizer.items()})
        self.trajectory[:snap.step] = snap.trajectory[:snap.step]
        self.trajectory[snap.step:] = 0
        self.history = list(snap.history)

    # ---- checkpoint ------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.ARRAYS}

    def save(self, out: Path) -> Path:
        groups = {"tensors": self.tensors, "optimizer": self.optimizer, "start": self.start, "best": self.best}
        return save_checkpoint(out, groups, self.trajectory[:self.step], self.meta())

    @classmethod
    def load(cls, out: Path, tensors: dict[str, np.ndarray], steps: int, width: int, bundle_id: str,
             config: dict[str, Any]) -> "RunState":
        """The checkpoint in out, its tensors copied into the live `tensors`; the trajectory sized for `steps`."""
        groups, traj, meta = load_checkpoint(out)
        where = f"{out / CHECKPOINT_FILE}"
        if meta.get("bundle_id") != bundle_id or meta.get("config") != config:
            raise ZoedgeError(f"--resume: {out} holds a run of another bundle or with other settings")
        known = {f.name for f in dataclasses.fields(cls)} - set(cls.ARRAYS)
        try:
            state = cls(**{k: v for k, v in meta.items() if k in known}, tensors=tensors,
                        trajectory=np.zeros((steps, width), np.float32))
            step = int(state.step)
        except (TypeError, ValueError) as e:
            raise ZoedgeError(f"{where}: malformed run state ({e})") from None
        if set(groups["tensors"]) != set(tensors) or traj.ndim != 2 or traj.shape[1] != width or \
                not 0 <= step == traj.shape[0] <= steps:
            raise ZoedgeError(f"{where}: does not fit this run (other tensors, trajectory or step count)")
        for k, v in groups["tensors"].items():
            if v.shape != tensors[k].shape:
                raise ZoedgeError(f"{where}: tensor {k!r} has shape {list(v.shape)}, the bundle has "
                                  f"{list(tensors[k].shape)}")
            np.copyto(tensors[k], v)
        state.trajectory[:step] = traj
        state.optimizer, state.start, state.best = groups["optimizer"], groups["start"], groups["best"]
        return state
