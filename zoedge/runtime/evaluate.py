"""`zoedge eval`: score a bundle, with or without a patch, on a labelled file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoedge.runtime.bundle import Bundle
from zoedge.runtime.forward import open_forward
from zoedge.runtime.memory import peak_rss_mb
from zoedge.runtime.patch import load_patch
from zoedge.runtime.evaluator import Evaluator, load_dataset


def evaluate(bundle_dir: str | Path, data: str | Path, patch: str | Path | None = None, limit: int = 0,
             batch: int = 16) -> dict:
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    if patch:  # refused unless it was trained on this bundle (or an identical re-export: same labels, tensors)
        doc, tensors = load_patch(patch, m)
        if doc.prompt_template:  # a decoder patch is read through the prompt it chose
            bundle.encoder.template = doc.prompt_template
    else:
        tensors = bundle.initial_trainables()
    dataset = load_dataset(data, m, limit)
    fwd = open_forward(bundle, tensors)
    metrics = Evaluator(bundle, fwd, batch)(dataset)
    return {**metrics, "n": len(dataset.texts), "peak_rss_mb": round(peak_rss_mb(), 1),
            "patch": str(patch) if patch else None}


def predict(bundle: Bundle, tensors: dict[str, np.ndarray], texts: list[str]) -> np.ndarray:
    fwd = open_forward(bundle, tensors)
    (logits,) = Evaluator(bundle, fwd).outputs(texts, ("logits",))
    return logits
