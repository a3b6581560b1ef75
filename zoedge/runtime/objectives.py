"""Scalar objectives for zeroth-order training. ZO needs only a number, so non-differentiable
metrics (accuracy, F1) work as losses too."""

from __future__ import annotations

import numpy as np

OBJECTIVES = ("ce", "accuracy", "f1", "lm")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def label_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example: the log-probability of its label."""
    return log_softmax(logits)[np.arange(len(labels)), labels]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-label_log_likelihood(logits, labels).mean())


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    pred = logits.argmax(-1)
    scores = []
    for c in range(logits.shape[-1]):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def lm_loss(nll_sum: np.ndarray, n_tokens: np.ndarray) -> float:
    return float(nll_sum.sum() / max(float(n_tokens.sum()), 1.0))


def classification_loss(name: str, logits: np.ndarray, labels: np.ndarray) -> float:
    if name == "ce":
        return cross_entropy(logits, labels)
    if name == "accuracy":
        return -accuracy(logits, labels)
    if name == "f1":
        return -macro_f1(logits, labels)
    raise ValueError(f"objective {name!r} is not a classification objective")
