"""Label-prior adaptation from unlabelled device data (`zoedge train --unlabelled FILE`).

A k-shot training set is balanced by construction (k per class); the texts a device will classify need not be
(Drugs.com test: 25% negative, 9% neutral, 65% positive). A head fitted by cross-entropy on the training set
carries the training set's label prior in its bias, so its predictions follow that prior. Under label shift
(p(x | y) the same, p(y) different) the Bayes-optimal classifier for the device's prior π_t differs from the
trained one only by log π_t − log π_s added to the logits, and π_t can be estimated from unlabelled texts by EM on
the model's own posteriors (Saerens, Latinne and Decaestecker, Neural Computation 2002): reweight every posterior
by π_t / π_s, renormalise, and set π_t to their mean, until it stops moving.

The shift lands in the head's bias, so the patch is an ordinary one (any consumer reads it unchanged) and the
trajectory still replays: only a head trained by its exact gradient (travelling whole in the patch's start
tensors) can take it, which the decoder and LoRA recipes are.

EM is only as good as the posteriors it reweights: with a labelled eval set, the shift is applied only when the
kept model beats the eval set's majority-class rate by PRIOR_MIN_SE binomial standard errors (`informative`);
otherwise the patch records why it was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zoedge.constants import PRIOR_EM_MAX_ITER, PRIOR_EM_TOL, PRIOR_FLOOR, PRIOR_MIN_SE, UNLABELLED_LIMIT
from zoedge.errors import ZoedgeError
from zoedge.manifest import OUTPUT_LOGITS, Manifest
from zoedge.runtime.data import read_examples
from zoedge.runtime.evaluator import Dataset, Evaluator, fmt
from zoedge.runtime.objectives import log_softmax


@dataclass
class PriorEstimate:
    source: np.ndarray  # the training labels' prior (what the fitted head assumes)
    target: np.ndarray  # estimated on the unlabelled texts
    iterations: int

    @property
    def shift(self) -> np.ndarray:
        """What to add to the logits (the head's bias)."""
        return np.log(self.target) - np.log(self.source)


def training_prior(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """The training labels' frequencies, add-one smoothed so that a class with no example keeps a finite log."""
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + num_labels)


def em_prior(logits: np.ndarray, source: np.ndarray, tol: float = PRIOR_EM_TOL,
             max_iter: int = PRIOR_EM_MAX_ITER) -> PriorEstimate:
    """The label prior of the texts behind `logits` (a model trained under prior `source`), by EM; every class
    keeps at least PRIOR_FLOOR so that its log stays finite."""
    post = np.exp(log_softmax(logits.astype(np.float64)))
    target = source.astype(np.float64).copy()
    it = 0
    for it in range(1, max_iter + 1):
        q = post * (target / source)
        q /= q.sum(1, keepdims=True)
        new = q.mean(0)
        done = float(np.abs(new - target).max()) < tol
        target = new
        if done:
            break
    target = np.maximum(target, PRIOR_FLOOR)
    return PriorEstimate(source.astype(np.float64), target / target.sum(), it)


def informative(accuracy: float, labels: np.ndarray) -> tuple[float, float]:
    """(z, majority rate): how many binomial standard errors `accuracy` on these labels lies above the accuracy of
    always predicting their most frequent class."""
    n = len(labels)
    p0 = float(np.bincount(labels).max()) / n
    se = (p0 * (1.0 - p0) / n) ** 0.5
    return ((accuracy - p0) / se if se > 0 else float("inf") if accuracy > p0 else float("-inf")), p0


def check_unlabelled(m: Manifest, head_lr: float | None, path: str | Path | None) -> None:
    """Refuse --unlabelled where the shift cannot land in a replayable patch (before any training)."""
    if path is None:
        return
    if m.task != "classify":
        raise ZoedgeError("--unlabelled adapts a classifier's label prior; this bundle's task is "
                          f"{m.task!r}")
    if not any(t.role == "head" and len(t.shape) == 1 for t in m.trainables):
        raise ZoedgeError("--unlabelled needs a head bias to move; this bundle's head has none")
    if not head_lr:
        raise ZoedgeError("--unlabelled needs the head trained by its exact gradient (--head-lr > 0): a head ZO "
                          "moved would not replay with the shift")
    read_examples(path, need_labels=False, limit=1)  # a missing or unreadable file fails here, not after training


def adapt_prior(evaluator: Evaluator, tensors: dict[str, np.ndarray], final: dict[str, np.ndarray],
                bias: str, train_labels: np.ndarray, path: str | Path, eval_set: Dataset | None,
                log: Callable[[str], None], eval_accuracy: float | None = None) -> dict:
    """Estimate the unlabelled texts' label prior under the final tensors and add the shift to final[bias] (in
    place). `tensors` are the live ones the evaluator's forward reads: they are set to `final` for the
    measurement and left there. eval_accuracy: the final tensors' accuracy on eval_set, for the informativeness
    check. Returns the record the patch keeps (with 'skipped' and no shift when the check fails)."""
    ex = read_examples(path, need_labels=False, limit=UNLABELLED_LIMIT)
    if eval_accuracy is not None and eval_set is not None and eval_set.labels is not None:
        z, p0 = informative(eval_accuracy, eval_set.labels)
        if z < PRIOR_MIN_SE:
            why = (f"eval accuracy {eval_accuracy:.3f} is {z:.1f} standard errors above the majority-class rate "
                   f"{p0:.3f} of {len(eval_set.labels)} eval texts (needs {PRIOR_MIN_SE:g}): the model's posteriors "
                   "are too weak for EM's estimate")
            log(f"--unlabelled: label prior not adapted: {why}")
            return {"unlabelled": len(ex.texts), "skipped": why}
    for k, v in final.items():
        np.copyto(tensors[k], v)
    (logits,) = evaluator.outputs(ex.texts, (OUTPUT_LOGITS,))
    est = em_prior(logits, training_prior(train_labels, logits.shape[1]))
    shift = est.shift.astype(np.float32)
    final[bias] += shift
    np.copyto(tensors[bias], final[bias])
    record = {"unlabelled": len(ex.texts), "source": est.source.round(6).tolist(),
              "estimated": est.target.round(6).tolist(), "bias_shift": shift.round(6).tolist(),
              "iterations": est.iterations}
    log(f"label prior of {len(ex.texts)} unlabelled texts by EM ({est.iterations} iterations): "
        + " ".join(f"{p:.3f}" for p in est.target) + " against the training set's "
        + " ".join(f"{p:.3f}" for p in est.source) + "; the head's bias moves by "
        + " ".join(f"{s:+.3f}" for s in shift))
    if eval_set is not None and eval_set.labels is not None:
        metrics = evaluator(eval_set)
        record["eval_accuracy"] = metrics["accuracy"]
        log(f"eval after the prior shift (the eval set keeps its own prior): {fmt(metrics)}")
    return record
