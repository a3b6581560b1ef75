"""The zeroth-order estimate of one step: the 2q losses at θ ± εz_i and the q projected gradients
(L+ - L-) / 2ε, from q sequential in-place perturbation cycles or from one batched forward over the bundle's
perturbed copies (P-RGE). Under --head-lr it also keeps each forward's features: the head's exact gradient
reads their mean."""

from __future__ import annotations

import numpy as np

from zoedge.manifest import OUTPUT_FEATURES, OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS, Manifest
from zoedge.runtime import objectives
from zoedge.runtime.config import TrainConfig
from zoedge.runtime.zo import DirectionCache, perturbation_cycle


class Estimator:
    """`estimate(step, ids, mask, y) -> (losses, grads)`: the ± forwards of one step on the moving tensors."""

    def __init__(self, fwd, m: Manifest, cfg: TrainConfig, moving: dict[str, np.ndarray], dirs: DirectionCache,
                 head: bool):
        self.fwd, self.m, self.cfg, self.moving, self.dirs = fwd, m, cfg, moving, dirs
        self.head = head
        self.outputs = (OUTPUT_LOGITS,) if m.task == "classify" else (OUTPUT_NLL, OUTPUT_TOKENS)
        if head:
            self.outputs = (OUTPUT_LOGITS, OUTPUT_FEATURES)
        self.features: list[np.ndarray] = []  # of this step's perturbed forwards (the exact head gradient reads them)
        self._mean: np.ndarray | None = None  # their mean, reused every step

    def loss_of(self, outs: list[np.ndarray], y) -> float:
        if self.head:
            self.features.append(outs[1])
        if self.m.task == "classify":
            return objectives.classification_loss(self.cfg.objective, outs[0], y)
        return objectives.lm_loss(outs[0], outs[1])

    def __call__(self, step: int, ids, mask, y) -> tuple[list[float], list[float]]:
        """The 2q losses and q projected gradients of this step (sequential in place, or one batched forward)."""
        cfg, fwd = self.cfg, self.fwd
        self.features.clear()
        if cfg.batched:
            fwd.load_perturbations([dict(self.dirs(cfg.seed, step, i)) for i in range(cfg.perturbations)], cfg.eps)
            outs = fwd.run_copies(ids, mask, self.outputs)
            losses = [self.loss_of([o[c] for o in outs], y) for c in range(self.m.copies)]
        else:
            losses = []
            for i in range(cfg.perturbations):
                losses += perturbation_cycle(self.moving, self.dirs, cfg.seed, step, i, cfg.eps,
                                             loss_at=lambda: self.loss_of(fwd(ids, mask, self.outputs), y))
        return losses, [(losses[2 * i] - losses[2 * i + 1]) / (2 * cfg.eps) for i in range(cfg.perturbations)]

    def head_features(self) -> np.ndarray:
        """The mean of the ± forwards' features: the unperturbed one to O(ε²); valid until the next step.

        Summed in place into a buffer kept between steps, from +0 and left to right, then divided by the count as
        np.mean does: the same bytes as np.mean(self.features, axis=0), which sums the stacked arrays' first axis
        in that order (numpy's pairwise summation runs only along the fast axis, and below 8 terms it is a plain
        loop too), without stacking them. np.mean stays for the two cases where it would sum otherwise: a
        single-element feature with 8 or more forwards (the first axis is then the fast one), and a dtype other
        than float32 (float16 sums in float32)."""
        fs = self.features
        if fs[0].dtype != np.float32 or (len(fs) >= 8 and fs[0].size == 1):
            return np.mean(fs, axis=0)
        if self._mean is None or self._mean.shape != fs[0].shape:
            self._mean = np.empty_like(fs[0])
        mean = self._mean
        mean.fill(0)
        for f in fs:
            mean += f
        return np.true_divide(mean, np.intp(len(fs)), out=mean, casting="unsafe")
