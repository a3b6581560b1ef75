"""The head's exact gradient, in numpy: logits = features·Wᵀ + b is linear in the head, and the graph returns the
features it reads, so the head needs no zeroth-order estimate. ZO is then spent only on the other trainables
(LoRA), whose dimension is what makes its estimate noisy (ElasticZO's split, without a gradient graph)."""

from __future__ import annotations

import numpy as np

from zoedge.manifest import Manifest
from zoedge.runtime.objectives import log_softmax


def head_names(m: Manifest) -> tuple[str, str | None]:
    """(weight, bias) trainable names of the classification head; raises KeyError when there is no weight."""
    heads = [t for t in m.trainables if t.role == "head"]
    weight = next(t.name for t in heads if len(t.shape) == 2)
    bias = next((t.name for t in heads if len(t.shape) == 1), None)
    return weight, bias


def ce_head_step(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                 lr: float, weight_decay: float = 0.0) -> float:
    """One gradient-descent step on the mean cross-entropy of softmax(features·Wᵀ + b), in place (float64 maths,
    float32 result); returns the loss before the step."""
    f = features.astype(np.float64)
    logits = f @ weight.astype(np.float64).T + (0.0 if bias is None else bias.astype(np.float64))
    logp = log_softmax(logits)
    n = len(labels)
    g = np.exp(logp)
    g[np.arange(n), labels] -= 1.0
    g /= n
    grad_w = g.T @ f + weight_decay * weight.astype(np.float64)
    weight -= np.float32(lr) * grad_w.astype(np.float32)
    if bias is not None:
        bias -= np.float32(lr) * g.sum(0).astype(np.float32)
    return float(-logp[np.arange(n), labels].mean())
