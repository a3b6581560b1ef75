"""Linear-probe head start: fit the classifier head on frozen features in closed form-ish (numpy).

MeZO's LP-then-ZO: a random head learns very slowly by ZO, a fitted one starts far above chance.
Multinomial logistic regression, full-batch gradient descent on standardised features with L2.
"""

from __future__ import annotations

import numpy as np


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_labels: int, l2: float = 1e-3,
                     iters: int = 500, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Returns (W [labels, hidden], b [labels]) for logits = features @ W.T + b."""
    x = features.astype(np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    n, h = xs.shape
    y = np.eye(num_labels)[labels]
    w = np.zeros((h, num_labels))
    b = np.zeros(num_labels)
    for _ in range(iters):
        z = xs @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - y) / n
        w -= lr * (xs.T @ g + l2 * w)
        b -= lr * g.sum(0)
    w_orig = (w / sd[:, None]).T  # undo the standardisation
    b_orig = b - (mu / sd) @ w
    return w_orig.astype(np.float32), b_orig.astype(np.float32)
