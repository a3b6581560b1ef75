"""The contenders of a k-shot cell, each run in its own process (`python -m bench.kshot cell --spec FILE`).

Every contender reads the same split files through the same bundle tokenizer and evaluates at batch 16 (int8
dynamic quantization makes logits depend on batch mates). `spec` is the dict bench.kshot writes: bundle paths,
split paths, model, contender settings.

- zero-shot: the bundle as exported. For an encoder that is its random linear head (chance level); for a
  decoder it is the prompt and label words.
- lp: a plain linear probe (zoedge.runtime.head_start.fit_probe_head with centred=False, numpy: logistic
  regression shrunk towards zero) on the k-shot training split, its L2 chosen by cross-entropy on the validation
  split, through the exported prompt (no prompt search).
- zoedge: `zoedge train BUNDLE --data train.tsv --eval val.tsv --unlabelled unlabelled.tsv --out P` (the default
  recipe; keep-best selects on the k-shot validation split only; where the task's pool is like its test (not
  SST-2), the unlabelled pool texts move the head's bias to their estimated label prior at the end), then
  `zoedge eval BUNDLE --patch P --data test.tsv`.
- backprop: PyTorch LoRA (the bundle's r, alpha, targets) + head through peft, AdamW (weight decay 0), linear
  schedule, from the exported tensors; validation every `eval_every` steps, the best on validation is tested.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

EVAL_BATCH = 16


def _open(bundle_dir: str):
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import Evaluator
    from zoedge.runtime.forward import open_forward

    bundle = Bundle.open(bundle_dir)
    tensors = bundle.initial_trainables()
    fwd = open_forward(bundle, tensors)
    return bundle, tensors, fwd, Evaluator(bundle, fwd, batch=EVAL_BATCH)


def _load(spec: dict, bundle, *names: str):
    from zoedge.runtime.evaluator import load_dataset

    return [load_dataset(spec["splits"][n], bundle.manifest) for n in names]


def zero_shot(spec: dict) -> dict:
    bundle, _, fwd, ev = _open(spec["bundle"])
    val, test = _load(spec, bundle, "val", "test")
    v, t = ev(val), ev(test)
    head = "random head (encoder, as exported)" if bundle.manifest.kind == "encoder" else "prompt + label words"
    return {"val_accuracy": v["accuracy"], "val_loss": v["loss"], "test_accuracy": t["accuracy"],
            "test_f1": t["f1"], "forward_passes": fwd.calls, "train_forward_passes": 0,
            "settings": {"head": head, "prompt": bundle.encoder.template or None}}


def linear_probe(spec: dict) -> dict:
    from zoedge.runtime.head_start import fit_probe_head

    bundle, tensors, fwd, ev = _open(spec["bundle"])
    train, val, test = _load(spec, bundle, "train", "val", "test")
    t0 = time.perf_counter()
    fit_probe_head(bundle.manifest, bundle, ev, train, tensors, len(train.texts), 0, [], lambda _m: None,
                   eval_set=val, centred=False)
    fit_s = time.perf_counter() - t0
    fit_calls = fwd.calls
    v, t = ev(val), ev(test)
    return {"val_accuracy": v["accuracy"], "val_loss": v["loss"], "test_accuracy": t["accuracy"],
            "test_f1": t["f1"], "forward_passes": fwd.calls, "train_forward_passes": fit_calls,
            "train_seconds": round(fit_s, 3),
            "settings": {"head": "linear probe (numpy, plain, L2 chosen by validation cross-entropy)", "examples": len(train.texts),
                         "prompt": bundle.encoder.template or None}}


def zoedge_default(spec: dict) -> dict:
    from zoedge.runtime.evaluate import evaluate
    from zoedge.runtime.trainer import TrainConfig, train

    out = Path(spec["work"]) / "patch"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(**spec.get("train_overrides", {}))  # {} = the default recipe, as `zoedge train` types it
    curve, clock = [], {"prev": None, "train": 0.0}

    def on_step(rec: dict) -> None:  # the trainer reports its own eval time: training seconds exclude it
        now = time.perf_counter()
        if clock["prev"] is not None:
            clock["train"] += now - clock["prev"] - rec.get("eval_seconds", 0.0)
        clock["prev"] = now
        if "eval_accuracy" in rec:
            curve.append({"step": rec["step"], "train_seconds": round(clock["train"], 3),
                          "val_accuracy": rec["eval_accuracy"]})

    t0 = clock["prev"] = time.perf_counter()  # step 1's time includes the start (bundle, head start)
    res = train(spec["bundle"], spec["splits"]["train"], out, cfg, eval_path=spec["splits"]["val"],
                on_step=on_step, log=lambda _m: None, unlabelled=spec["splits"].get("unlabelled"))
    train_s = time.perf_counter() - t0
    train_rss = res["peak_rss_mb"]  # before the test evaluation opens the bundle a second time
    test = evaluate(spec["bundle"], spec["splits"]["test"], patch=out, batch=EVAL_BATCH)
    n_test_calls = -(-test["n"] // EVAL_BATCH)
    hist = res.get("history") or []
    return {"val_accuracy": res["eval_accuracy"], "test_accuracy": test["accuracy"], "test_f1": test["f1"],
            "forward_passes": res["forward_passes"] + n_test_calls, "train_seconds": round(train_s, 2),
            "train_forward_passes": res["forward_passes"], "train_peak_rss_mb": train_rss,
            "detail": {"val_accuracy_start": res["eval_accuracy_start"],
                       "val_accuracy_head_start": res["eval_accuracy_head_start"], "best_step": res["steps"],
                       "steps_run": res["steps_run"], "rollbacks": res["rollbacks"], "kept_gain": res.get("kept_gain"),
                       "label_prior": res.get("label_prior"), "curve": curve,
                       "history": hist, "prompt": res.get("prompt_template")},
            "settings": {"recipe": "zoedge train defaults" if not spec.get("train_overrides") else "overridden",
                         "overrides": spec.get("train_overrides", {}), "hyperparameters": _hyper(out)}}


def _hyper(patch: Path) -> dict:
    import json

    doc = json.loads((patch / "patch.json").read_text())
    h = doc.get("hyperparameters") or doc.get("meta", {}).get("hyperparameters") or {}
    keep = ("steps", "batch_size", "lr", "eps", "optimizer", "objective", "head_init", "lp_examples", "perturbations",
            "eval_every", "keep", "select", "seed", "lr_schedule", "weight_decay", "prompt", "patience")
    return {k: h.get(k) for k in keep}


# ---- backprop --------------------------------------------------------------------------------------------------


def _torch_scores(module, bundle, data) -> tuple[float, float, float]:
    """(accuracy, cross-entropy, macro-F1) of the torch module on a dataset, eval mode, batch 16."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from zoedge.runtime.objectives import macro_f1

    module.eval()
    parts = []
    with torch.inference_mode():
        for i in range(0, len(data.texts), EVAL_BATCH):
            ids, mask = data.batch(bundle.encoder, np.arange(i, min(i + EVAL_BATCH, len(data.texts))))
            parts.append(module(torch.from_numpy(ids), torch.from_numpy(mask))[0])
    logits = torch.cat(parts)
    loss = float(F.cross_entropy(logits, torch.from_numpy(data.labels)))
    acc = float((logits.argmax(-1).numpy() == data.labels).mean())
    return acc, loss, macro_f1(logits.numpy(), data.labels)


def backprop(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from bench.sidebyside.contenders import torch_setup  # the peft module `zoedge export` exports, bundle tensors
    from zoedge.runtime.evaluator import load_dataset
    from zoedge.runtime.trainer import batch_indices

    bp = spec["backprop"]
    module, params, bundle, train, test = torch_setup(spec["model"], spec["bundle_fp32"], spec["splits"]["train"],
                                                      spec["splits"]["test"], threads=spec["threads"])
    val = load_dataset(spec["splits"]["val"], bundle.manifest)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=bp["lr"], weight_decay=0.0)
    steps = bp["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))
    best, curve, train_s = None, [], 0.0
    for step in range(1, steps + 1):
        t = time.perf_counter()
        module.train()  # dropout on, as in fine-tuning
        idx = batch_indices(0, step, len(train.texts), bp["batch"])
        ids, mask = train.batch(bundle.encoder, idx)
        opt.zero_grad(set_to_none=True)
        logits = module(torch.from_numpy(ids), torch.from_numpy(mask))[0]
        loss = F.cross_entropy(logits, torch.from_numpy(train.labels[idx]))
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t
        if step % bp["eval_every"] == 0 or step == steps:
            acc, ce, _ = _torch_scores(module, bundle, val)
            curve.append({"step": step, "train_seconds": round(train_s, 3), "val_accuracy": acc, "val_loss": ce,
                          "train_loss": float(loss)})
            if best is None or acc > best["val_accuracy"]:
                best = {"step": step, "val_accuracy": acc, "val_loss": ce,
                        "tensors": {k: p.detach().clone() for k, p in params.items()}}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best["tensors"][k])
    test_acc, test_loss, test_f1 = _torch_scores(module, bundle, test)
    evals = len(curve) * -(-len(val.texts) // EVAL_BATCH) + -(-len(test.texts) // EVAL_BATCH)
    return {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"], "test_accuracy": test_acc,
            "test_loss": test_loss, "test_f1": test_f1, "forward_passes": steps + evals, "train_forward_passes": steps,
            "backward_passes": steps, "train_seconds": round(train_s, 2),
            "detail": {"best_step": best["step"], "curve": curve},
            "settings": {"lr": bp["lr"], "batch": bp["batch"], "steps": steps, "eval_every": bp["eval_every"],
                         "optimizer": "AdamW (torch), weight decay 0", "schedule": "linear to 0, no warmup",
                         "trainable": "LoRA (bundle's r, alpha, targets) + head", "start": "exported tensors",
                         "selection": "best validation accuracy (first reached)", "bundle": "fp32 (torch module)"}}


CONTENDERS = {"zero-shot": zero_shot, "lp": linear_probe, "zoedge": zoedge_default, "backprop": backprop}
