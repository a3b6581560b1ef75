"""How much an int8 (dynamic activation quantization) bundle's test accuracy depends on the eval batch.

DynamicQuantizeLinear picks one activation scale per tensor over the whole batch, and batches are padded
to their longest row, so a sentence's logits depend on its batch mates. Evaluates fixed tensors (the
bundle's initial ones, and a patch if given) on test.tsv at several batch sizes.
  ZOEDGE_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/batch_dependence.py /tmp/learn/bundles/mini-lora8qv [PATCH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from zoedge.runtime.bundle import Bundle
from zoedge.runtime.engine import create_session
from zoedge.runtime.forward import BoundForward
from zoedge.runtime.patch import load_patch_tensors
from zoedge.runtime.evaluator import Evaluator, load_dataset

TEST = Path("/work/shared/data/sst2/test.tsv")


def main() -> None:
    b = Bundle.open(sys.argv[1])
    tensors = load_patch_tensors(sys.argv[2], b.manifest) if len(sys.argv) > 2 else b.initial_trainables()
    data = load_dataset(TEST, b.manifest)
    fwd = BoundForward(create_session(b.path, b.manifest), tensors)
    out, preds = {}, {}
    for bs in (1, 16, 64):
        (logits,) = Evaluator(b, fwd, batch=bs).outputs(data.texts, ("logits",))
        preds[bs] = logits.argmax(1)
        out[bs] = {"accuracy": round(float((preds[bs] == data.labels).mean()), 4)}
    for bs in (16, 64):
        out[bs]["changed_vs_batch1"] = int((preds[bs] != preds[1]).sum())
    print(json.dumps({"bundle": sys.argv[1], "patch": sys.argv[2] if len(sys.argv) > 2 else None, "by_batch": out}))


if __name__ == "__main__":
    main()
