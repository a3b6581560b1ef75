"""A sensitivity mask for the ZO-moved tensors (issue 12's "fewer perturbed dimensions" lever), found with torch.

  python -m bench.zo_mask MODEL BUNDLE_FP32 SPLIT_DIR OUT.safetensors [--keep 0.01] [--criterion fisher|grad]

The mask keeps the `--keep` fraction of the LoRA entries with the largest empirical Fisher, the sum over examples
of the squared per-example gradient of the cross-entropy (`--criterion grad`: the square of the summed gradient,
the direction the training loss falls along), taken where ZO starts: the bundle's LoRA tensors and a
head fitted first on the same examples (head only, AdamW, full batch, `--head-steps`; LoRA frozen), as zoedge's
head start fits one (0 for a decoder, whose exported label-word head is already the zero-shot classifier).
Written as float32 0/1 tensors under the trainables' names, for `python -m bench.kshot_explore train --mask`.

The examples are SPLIT_DIR/train.tsv: the mask is an *oracle* (a device has no torch to compute it, an export
has not seen the device's data), the upper bound of what a static mask can give on this split. `--names REGEX`
instead keeps every entry of the LoRA tensors whose name matches (a structural mask, no torch, no data).
Exploration only: nothing here is the product.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LORA = ("lora_A", "lora_B")  # the roles a mask covers (zoedge.manifest.ROLES)


def fisher(model: str, bundle_fp32: str, split: Path, threads: int, head_steps: int = 100,
           criterion: str = "fisher") -> dict:
    import torch
    import torch.nn.functional as F

    from bench.sidebyside.contenders import torch_setup

    module, params, bundle, train, _ = torch_setup(model, bundle_fp32, str(split / "train.tsv"),
                                                  str(split / "val.tsv"), threads=threads)
    m = bundle.manifest
    roles = {t.name: t.role for t in m.trainables}
    lora = {k: p for k, p in params.items() if roles[k] in LORA}
    head = {k: p for k, p in params.items() if roles[k] == "head"}
    module.eval()  # no dropout: the gradients of the model ZO sees
    ids, mask = bundle.encoder(train.texts)
    ids, mask, y = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(train.labels)
    for p in lora.values():
        p.requires_grad_(False)
    for p in head.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(head.values()), lr=1e-2, weight_decay=1e-2)
    for _ in range(head_steps):  # the head first: gradients at an untrained head are not where ZO starts
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(ids, mask)[0], y).backward()
        opt.step()
    for p in head.values():
        p.requires_grad_(False)
    for p in lora.values():
        p.requires_grad_(True)
    acc = {k: torch.zeros_like(p) for k, p in lora.items()}  # Σ g² (fisher) or Σ g (grad)
    for i in range(len(y)):
        module.zero_grad(set_to_none=True)
        F.cross_entropy(module(ids[i:i + 1], mask[i:i + 1])[0], y[i:i + 1]).backward()
        for k, p in lora.items():
            if p.grad is not None:
                acc[k] += p.grad.detach() ** 2 if criterion == "fisher" else p.grad.detach()
    return {k: (v if criterion == "fisher" else v ** 2).numpy() for k, v in acc.items()}


def top_mask(f: dict, keep: float) -> tuple[dict, dict]:
    """0/1 float32 masks keeping the largest `keep` fraction of all entries together (ties at the cut all kept)."""
    import numpy as np

    flat = np.concatenate([v.ravel() for v in f.values()])
    n = max(1, int(round(keep * flat.size)))
    cut = np.partition(flat, flat.size - n)[flat.size - n]
    masks = {k: (v >= cut).astype(np.float32) for k, v in f.items()}
    kept = int(sum(v.sum() for v in masks.values()))
    share = float(flat[flat >= cut].sum() / flat.sum()) if flat.sum() > 0 else 0.0
    return masks, {"entries": int(flat.size), "kept": kept, "score_share_kept": round(share, 4),
                   "tensors_touched": sum(bool(v.any()) for v in masks.values())}


def name_mask(bundle_dir: str, pattern: str) -> tuple[dict, dict]:
    """All-ones for the LoRA tensors whose name matches `pattern`, zeros for the other LoRA tensors."""
    import re

    import numpy as np

    from zoedge.runtime.bundle import Bundle

    m = Bundle.open(bundle_dir).manifest
    lora = [t for t in m.trainables if t.role in LORA]
    masks = {t.name: np.full(t.shape, float(bool(re.search(pattern, t.name))), np.float32) for t in lora}
    kept = int(sum(v.sum() for v in masks.values()))
    return masks, {"entries": int(sum(v.size for v in masks.values())), "kept": kept,
                   "tensors_touched": sum(bool(v.any()) for v in masks.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.zo_mask", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("bundle_fp32")
    ap.add_argument("split", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--keep", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head-steps", type=int, default=100)
    ap.add_argument("--criterion", choices=("fisher", "grad"), default="fisher")
    ap.add_argument("--names", help="a structural mask instead: the LoRA tensors whose name matches this regex")
    a = ap.parse_args(argv)
    from safetensors.numpy import save_file

    if a.names:
        masks, info = name_mask(a.bundle_fp32, a.names)
    else:
        masks, info = top_mask(fisher(a.model, a.bundle_fp32, a.split, a.threads, a.head_steps, a.criterion),
                               a.keep)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(masks, str(a.out))
    how = {"names": a.names} if a.names else {"keep": a.keep, "criterion": a.criterion}
    print(json.dumps({"out": str(a.out), **how, **info}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
