"""Datasets tokenised once, and scoring the current trainable tensors on them (accuracy / loss), in batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoedge.manifest import OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS, Manifest
from zoedge.runtime import objectives
from zoedge.runtime.data import label_indices, read_examples
from zoedge.runtime.text import TextEncoder


@dataclass
class Dataset:
    texts: list[str]
    labels: np.ndarray | None
    _tokens: dict[str, list[list[int]]] = field(default_factory=dict, repr=False)  # template -> token ids

    def rows(self, encoder: TextEncoder) -> list[list[int]]:
        """Every example's token ids through the encoder's template, tokenised once per template."""
        rows = self._tokens.get(encoder.template)
        if rows is None:
            rows = self._tokens[encoder.template] = encoder.token_ids(self.texts)
        return rows

    def batch(self, encoder: TextEncoder, idx) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of the examples idx, padded per batch."""
        rows = self.rows(encoder)
        return encoder.pad([rows[i] for i in idx])


def load_dataset(path: str | Path, m: Manifest, limit: int = 0) -> Dataset:
    ex = read_examples(path, need_labels=m.task == "classify", limit=limit or None)
    labels = np.asarray(label_indices(ex, m.labels, path), dtype=np.int64) if m.task == "classify" else None
    return Dataset(ex.texts, labels)


class Evaluator:
    """Accuracy / loss of the current tensors on a dataset, in batches."""

    def __init__(self, bundle, fwd, batch: int = 16):
        self.bundle, self.fwd, self.batch = bundle, fwd, batch

    def outputs(self, data: Dataset | list[str], names: tuple[str, ...], idx=None) -> list[np.ndarray]:
        """The named graph outputs for every example of data (or of the indices idx), concatenated."""
        if isinstance(data, list):
            data = Dataset(data, None)
        order = np.arange(len(data.texts)) if idx is None else np.asarray(idx)
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, len(order), self.batch):
            ids, mask = data.batch(self.bundle.encoder, order[i:i + self.batch])
            for p, o in zip(parts, self.fwd(ids, mask, names)):
                p.append(o)
        return [np.concatenate(p) for p in parts]

    def __call__(self, data: Dataset) -> dict[str, float]:
        return self.measure(data)[0]

    def measure(self, data: Dataset) -> tuple[dict[str, float], np.ndarray | None]:
        """The metrics and, on labelled data, the logits they came from (for paired comparisons)."""
        if data.labels is not None:
            (logits,) = self.outputs(data, (OUTPUT_LOGITS,))
            return {"accuracy": objectives.accuracy(logits, data.labels),
                    "loss": objectives.cross_entropy(logits, data.labels),
                    "f1": objectives.macro_f1(logits, data.labels)}, logits
        nll, n = self.outputs(data, (OUTPUT_NLL, OUTPUT_TOKENS))
        loss = objectives.lm_loss(nll, n)
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50)))}, None


def score(metrics: dict[str, float], by: str = "loss") -> float:
    """Higher is better: -loss (cross-entropy, or the LM loss), or accuracy when by="accuracy" and there is one."""
    return metrics["accuracy"] if by == "accuracy" and "accuracy" in metrics else -metrics["loss"]


def paired_gain(before: np.ndarray, after: np.ndarray, labels: np.ndarray, by: str = "loss") -> tuple[float, float]:
    """How much better the logits `after` score than `before` on the same examples, and the standard error of that
    mean difference: per example, the label's log-likelihood (by="loss") or being right (by="accuracy")."""
    if by == "accuracy":
        d = (after.argmax(-1) == labels).astype(np.float64) - (before.argmax(-1) == labels)
    else:
        d = objectives.label_log_likelihood(after, labels) - objectives.label_log_likelihood(before, labels)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")


def paired_gain_of(evaluator: Evaluator, live: dict[str, np.ndarray], before: dict[str, np.ndarray],
                   after: dict[str, np.ndarray], data: Dataset, by: str = "loss") -> tuple[float, float]:
    """paired_gain of the tensor values `after` over `before` on data: each set is copied in turn into `live` (the
    arrays bound to the evaluator's engine), whose own values are restored afterwards."""
    saved = {k: v.copy() for k, v in live.items()}
    logits = []
    for values in (before, after):
        for k, v in values.items():
            np.copyto(live[k], v)
        logits.append(evaluator.measure(data)[1])
    for k, v in saved.items():
        np.copyto(live[k], v)
    return paired_gain(logits[0], logits[1], data.labels, by)


def fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
