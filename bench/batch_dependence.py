"""How much a bundle's test accuracy depends on the eval batch (int8 dynamic activation quantization).

DynamicQuantizeLinear picks one activation scale per tensor over the whole batch, and batches are padded
to their longest row, so a sentence's logits depend on its batch mates. Evaluates fixed tensors (the
bundle's initial ones, or a patch's) on SST-2 test.tsv at each batch size; prints one JSON line.
  ZOEDGE_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python -m bench.batch_dependence BUNDLE [--patch PATCH]
      [--data ../shared/data/sst2] [--batches 1,16,64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import SST2


def measure(bundle_dir: Path, patch: Path | None, test: Path, batches: list[int]) -> dict:
    """{bundle, patch, by_batch: {B: {accuracy, changed_vs_batch<first B>}}}."""
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import BoundForward
    from zoedge.runtime.patch import load_patch_tensors

    b = Bundle.open(bundle_dir)
    tensors = load_patch_tensors(patch, b.manifest) if patch else b.initial_trainables()
    data = load_dataset(test, b.manifest)
    fwd = BoundForward(create_session(b.path, b.manifest), tensors)
    out, preds = {}, {}
    for bs in batches:
        (logits,) = Evaluator(b, fwd, batch=bs).outputs(data.texts, ("logits",))
        preds[bs] = logits.argmax(1)
        out[bs] = {"accuracy": round(float((preds[bs] == data.labels).mean()), 4)}
    first = batches[0]
    for bs in batches[1:]:
        out[bs][f"changed_vs_batch{first}"] = int((preds[bs] != preds[first]).sum())
    return {"bundle": str(bundle_dir), "patch": str(patch) if patch else None, "test": str(test), "by_batch": out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_dependence", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--patch", type=Path, help="evaluate this patch's tensors (default: the bundle's initial ones)")
    ap.add_argument("--data", type=Path, default=SST2, help="SST-2 directory (test.tsv is read)")
    ap.add_argument("--batches", default="1,16,64", help="eval batch sizes; the first is the reference")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    doc = measure(a.bundle, a.patch, a.data / "test.tsv", [int(x) for x in a.batches.split(",") if x.strip()])
    print(json.dumps(doc))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
