"""One function per contender; each runs in its own worker process (bench.sidebyside.worker).

Every contender sees the same bundle tokenizer, batch size, sequence length, minibatches
(`trainer.batch_indices(seed, step)`) and test sentences. Step times are medians after `warmup` steps and
exclude evaluation; learning curves report test accuracy against training seconds (evaluation excluded)
and forward passes, from the same start. The zoedge contenders import no torch.

`s` is the settings dict written by bench.sidebyside.run (paths, model, batch, steps, ...).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


def _median(xs: list[float], warmup: int) -> float | None:
    xs = xs[warmup:] if len(xs) > warmup else xs
    return round(float(np.median(xs)) * 1000, 2) if xs else None  # ms


def _data(s: dict, bundle_dir: str):
    return open_data(bundle_dir, s["train"], s["test"], s["test_limit"], s.get("prompt"))


def open_data(bundle_dir: str, train: str, test: str, test_limit: int = 0, prompt: str | None = None):
    """(bundle, train dataset, test dataset); `prompt` (the template a shared start chose, decoders) replaces the
    bundle's, so every contender reads through it. test_limit 0 = every test row."""
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import load_dataset

    b = Bundle.open(bundle_dir)
    if prompt:
        b.encoder.template = prompt
    return b, load_dataset(train, b.manifest), load_dataset(test, b.manifest, test_limit)


def _batches(s: dict, bundle, train, steps: int):
    from zoedge.runtime.trainer import batch_indices

    for step in range(1, steps + 1):
        idx = batch_indices(s["seed"], step, len(train.texts), s["batch"])
        ids, mask = bundle.encoder([train.texts[i] for i in idx])
        yield ids, mask, train.labels[idx]


# ---- 1. onnxruntime inference on the bundle: the memory floor ------------------------------------------


def ort_infer(s: dict, quant: str) -> dict:
    """Forward passes at batch B over every sentence a ZO run touches (the training set, as the linear probe
    reads it, and the test set, as evaluation does: so the same tensor shapes reach onnxruntime's arena),
    then timed forwards over the training minibatches of steps 1..N."""
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.evaluator import Evaluator

    bundle, train, test = _data(s, s["bundles"][quant])
    fwd = open_forward(bundle, bundle.initial_trainables())
    ev = Evaluator(bundle, fwd, batch=s["batch"])
    if s["encoder"]:
        ev.outputs(train.texts, ("features",))
    acc = ev(test)["accuracy"]
    times = []
    for ids, mask, _ in _batches(s, bundle, train, s["steps"]):
        t = time.perf_counter()
        fwd(ids, mask, ("logits",))
        times.append(time.perf_counter() - t)
    return {"forward_ms": _median(times, s["warmup"]), "forward_passes_per_step": 1,
            "test_accuracy_initial": round(acc, 4), "steps_timed": len(times) - s["warmup"]}


# ---- 2. zoedge ZO through the real trainer ----------------------------------------------------------------


def zoedge_zo(s: dict, quant: str, learn: bool) -> dict:
    """`zoedge.runtime.trainer.train` itself (default recipe); timing comes from its on_step callback, with
    the trainer's own evaluations timed and subtracted."""
    from zoedge.runtime import trainer

    steps = s["learn_steps"] if learn else s["steps"]
    bundle_dir = s["bundles"][quant]
    out = Path(s["work"]) / "patches" / f"zo-{quant}-{'learn' if learn else 'time'}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = trainer.TrainConfig(steps=steps, batch_size=s["batch"], seed=s["seed"],
                              eval_every=s["eval_every"] if learn else steps, keep="last", eval_limit=s["test_limit"],
                              head_init="lp" if s.get("start_head") else "none",  # the default recipe's start
                              prompt=s.get("prompt"))
    marks: list[dict] = []
    step_s: list[float] = []
    clock = {"prev": None, "train": 0.0}

    def on_step(rec: dict) -> None:  # the trainer reports its own eval time in the step record
        now = time.perf_counter()
        if clock["prev"] is not None:
            dt = now - clock["prev"] - rec.get("eval_seconds", 0.0)
            step_s.append(dt)
            clock["train"] += dt
        clock["prev"] = now
        if "eval_accuracy" in rec:
            marks.append({"step": rec["step"], "seconds": round(clock["train"], 3), "accuracy": rec["eval_accuracy"]})

    t0 = time.perf_counter()
    res = trainer.train(bundle_dir, s["train"], out, cfg, eval_path=s["test"], on_step=on_step, log=lambda _m: None)
    copies = trainer.Bundle.open(bundle_dir).manifest.copies
    q = copies // 2 if copies else 1
    fwd_per_step = 1 if copies else 2 * q
    start = res["history"][0]["eval_accuracy"] if res["history"] else None
    curve = [{"step": 0, "seconds": 0.0, "forward_passes": 0, "accuracy": start}]
    curve += [{**m, "forward_passes": m["step"] * fwd_per_step} for m in marks]
    return {"step_ms": _median(step_s, s["warmup"]), "forward_passes_per_step": fwd_per_step,
            "evaluations_per_step": 2 * q, "rows_per_forward": s["batch"] * (copies or 1), "q": q,
            "steps": steps, "train_seconds": round(clock["train"], 2), "wall_seconds": round(time.perf_counter() - t0, 2),
            "test_accuracy_start": start, "test_accuracy_final": curve[-1]["accuracy"] if learn else res["eval_accuracy"],
            "curve": curve if learn else None, "recipe": _recipe(out),
            "trainer_forward_passes_total": res["forward_passes"], "rollbacks": res["rollbacks"]}


def _recipe(patch: Path) -> dict:
    meta = json.loads((patch / "patch.json").read_text())
    h = meta.get("hyperparameters") or meta.get("meta", {}).get("hyperparameters") or {}
    return {k: h.get(k) for k in ("lr", "eps", "optimizer", "perturbations", "batched", "head_init", "objective")}


# ---- shared by the torch contenders ------------------------------------------------------------------------


def _torch_setup(s: dict):
    return torch_setup(s["model"], s["bundles"]["fp32"], s["train"], s["test"], test_limit=s["test_limit"],
                       prompt=s.get("prompt"), trainable=s["trainable"], start_head=s.get("start_head"),
                       threads=s["threads"])


def torch_setup(model: str, bundle_fp32: str, train: str, test: str, *, test_limit: int = 0,
                prompt: str | None = None, trainable: str = "lora,head", start_head: str | None = None,
                threads: int = 0):
    """The peft task module of `model` (what `zoedge export` exports) with the fp32 bundle's initial LoRA
    tensors, or the head in the `start_head` safetensors file when given; `threads` > 0 sets torch's thread
    count. Returns (module, {trainable name: parameter}, bundle, train dataset, test dataset)."""
    import torch

    from zoedge.export.assemble import build_selection
    from zoedge.export.trainables import parse_kinds
    from zoedge.models.registry import load_source
    from zoedge.runtime.tensors import load_tensors

    if threads:
        torch.set_num_threads(threads)
    bundle, train_data, test_data = open_data(bundle_fp32, train, test, test_limit, prompt)
    m = bundle.manifest
    src = load_source(model)
    torch.manual_seed(0)
    sel = build_selection(src, m.task, len(m.labels), m.label_token_ids, parse_kinds(trainable),
                          m.lora.rank if m.lora else 8, m.lora.alpha if m.lora else 16.0,
                          m.lora.targets if m.lora else None)
    named = dict(sel.module.named_parameters())
    params = {k: named[v] for k, v in sel.param_names.items()}
    start = bundle.initial_trainables()
    if start_head:
        start.update(load_tensors(start_head))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.from_numpy(start[k]))
    return sel.module, params, bundle, train_data, test_data


def _torch_accuracy(module, bundle, test, batch: int) -> float:
    import torch

    module.eval()
    right = 0
    with torch.inference_mode():
        for i in range(0, len(test.texts), batch):
            ids, mask = bundle.encoder(test.texts[i:i + batch])
            logits = module(torch.from_numpy(ids), torch.from_numpy(mask))[0]
            right += int((logits.argmax(-1).numpy() == test.labels[i:i + batch]).sum())
    return round(right / len(test.texts), 4)


def _curve_loop(s: dict, steps: int, step_fn, acc_fn, fwd_per_step: int, learn: bool, every: int = 0) -> dict:
    """Run step_fn over the shared minibatches; time each step (tokenisation included, as in the zoedge
    trainer's step); evaluate every `every` steps (not timed)."""
    bundle, train = s["_bundle"], s["_train"]
    step_s, curve, clock = [], [], 0.0
    if learn:
        curve.append({"step": 0, "seconds": 0.0, "forward_passes": 0, "accuracy": acc_fn()})
    batches = _batches(s, bundle, train, steps)
    for step in range(1, steps + 1):
        t = time.perf_counter()
        ids, mask, y = next(batches)
        step_fn(step, ids, mask, y)
        dt = time.perf_counter() - t
        step_s.append(dt)
        clock += dt
        if learn and (step % (every or s["eval_every"]) == 0 or step == steps):
            curve.append({"step": step, "seconds": round(clock, 3), "forward_passes": step * fwd_per_step,
                          "accuracy": acc_fn()})
    return {"step_ms": _median(step_s, s["warmup"]), "forward_passes_per_step": fwd_per_step, "steps": steps,
            "train_seconds": round(clock, 2), "curve": curve if learn else None,
            "test_accuracy_start": curve[0]["accuracy"] if learn else None,
            "test_accuracy_final": curve[-1]["accuracy"] if learn else None}


# ---- 3. PyTorch MeZO (princeton-nlp/MeZO large_models/trainer.py, on the same LoRA + head tensors) ---------


def torch_mezo(s: dict, learn: bool) -> dict:
    import torch
    import torch.nn.functional as F

    module, params, bundle, train, test = _torch_setup(s)
    s.update(_bundle=bundle, _train=train)
    module.eval()  # MeZO runs its forward passes in eval mode
    named = list(params.items())
    recipe = _zo_recipe(bundle.manifest)
    eps, lr = recipe["eps"], recipe["lr"]
    rng = np.random.default_rng(s["seed"])

    def perturb(seed: int, scaling: float) -> None:  # MeZO's zo_perturb_parameters
        torch.manual_seed(seed)
        for _, p in named:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling * z * eps

    def loss(ids, mask, y) -> float:
        return float(F.cross_entropy(module(ids, mask)[0], y))

    def step_fn(step, ids, mask, y) -> None:
        ids, mask, y = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
        with torch.inference_mode():
            seed = int(rng.integers(1_000_000_000))  # zo_step: self.zo_random_seed = np.random.randint(1000000000)
            perturb(seed, 1)
            l1 = loss(ids, mask, y)
            perturb(seed, -2)
            l2 = loss(ids, mask, y)
            g = (l1 - l2) / (2 * eps)
            perturb(seed, 1)
            torch.manual_seed(seed)  # zo_update: regenerate z from the same seed
            for _, p in named:
                z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
                p.data = p.data - lr * (g * z)  # weight decay 0, as in the zoedge recipe

    res = _curve_loop(s, s["learn_steps"] if learn else s["steps"], step_fn,
                      lambda: _torch_accuracy(module, bundle, test, s["batch"]), 2, learn)
    return {**res, "recipe": {"lr": lr, "eps": eps, "optimizer": "zo-sgd (MeZO)", "mode": "torch.inference_mode, eval"}}


def _zo_recipe(m) -> dict:
    from zoedge.runtime.trainer import default_recipe

    return default_recipe(m)


# ---- 4. PyTorch backprop: LoRA + head through peft, AdamW ----------------------------------------------------


def torch_backprop(s: dict, learn: bool) -> dict:
    import torch
    import torch.nn.functional as F

    module, params, bundle, train, test = _torch_setup(s)
    s.update(_bundle=bundle, _train=train)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=s["backprop_lr"])

    def step_fn(step, ids, mask, y) -> None:
        module.train()
        opt.zero_grad(set_to_none=True)
        logits = module(torch.from_numpy(ids), torch.from_numpy(mask))[0]
        F.cross_entropy(logits, torch.from_numpy(y)).backward()
        opt.step()

    res = _curve_loop(s, s["backprop_steps"] if learn else s["steps"], step_fn,
                      lambda: _torch_accuracy(module, bundle, test, s["batch"]), 1, learn,
                      s["backprop_eval_every"])
    return {**res, "recipe": {"lr": s["backprop_lr"], "optimizer": "AdamW (torch)", "mode": "train mode (dropout on)"},
            "backward_passes_per_step": 1}


# ---- 5. onnxruntime-training 1.19.2 (first-order, in its own venv) -------------------------------------------


def ort_training(s: dict) -> dict:
    """Export (here, torch) an opset-14 training graph of the plain peft model; generate artifacts and train in
    the isolated venv, each in its own process (the training process's peak RSS is the row's)."""
    import torch

    from bench.sidebyside import ortvenv

    work = Path(s["work"]) / "ort-training"
    shutil.rmtree(work, ignore_errors=True)
    (work / "artifacts").mkdir(parents=True)  # generate_artifacts needs the directory to exist
    module, params, bundle, train, _ = _torch_setup(s)

    class LogitsOnly(torch.nn.Module):  # generate_artifacts feeds every graph output to the loss
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(ids, mask)[0]

    for sub in module.modules():  # sdpa attention exports IsNaN/Where nodes that the gradient builder rejects
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
    model = LogitsOnly(module).eval()
    ids, mask, _ = next(_batches(s, bundle, train, 1))
    onnx_path = work / "train.onnx"
    torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(onnx_path), dynamo=False,
                      opset_version=14, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"},
                                    "logits": {0: "b"}})
    requires_grad = [n for n, p in model.named_parameters() if any(p is q for q in params.values())]
    batches = list(_batches(s, bundle, train, s["steps"]))
    arrays = {f"{k}_{i}": a for i, b in enumerate(batches) for k, a in zip(("ids", "mask", "y"), b)}
    np.savez(work / "data.npz", n=np.array(len(batches)), **arrays)
    py = ortvenv.ensure(log=lambda m: None)
    script = Path(__file__).with_name("ort_training_run.py")
    common = [str(py), str(script), "--work", str(work)]
    gen = subprocess.run([*common, "generate", "--requires-grad", json.dumps(requires_grad)],
                         capture_output=True, text=True, timeout=1800)
    if gen.returncode:
        raise RuntimeError("generate_artifacts failed: " + (gen.stderr.strip().splitlines() or ["?"])[-1][:300])
    run = subprocess.run([*common, "train", "--lr", str(s["backprop_lr"]), "--warmup", str(s["warmup"]),
                          "--threads", str(s["threads"])],
                         capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise RuntimeError("training failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:300])
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["generate"] = json.loads(gen.stdout.strip().splitlines()[-1])
    out["note"] = "timing and memory only (no accuracy curve); the graph is the plain peft model, eager attention"
    return out


# ---- prep: the shared start head (linear probe on fp32 bundle features, numpy) --------------------------------


def start_head(s: dict) -> dict:
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.tensors import save_tensors
    from zoedge.runtime.evaluator import Evaluator
    from zoedge.runtime.head_start import fit_probe_head

    bundle, train, _ = _data(s, s["bundles"]["fp32"])
    tensors = bundle.initial_trainables()
    ev = Evaluator(bundle, open_forward(bundle, tensors), batch=s["batch"])
    m = bundle.manifest
    head, searched = fit_probe_head(m, bundle, ev, train, tensors, 4000, s["seed"], m.prompt_candidates, lambda _m: None)
    save_tensors(head, s["start_head"])
    return {"tensors": sorted(head), "prompt": bundle.encoder.template if m.kind == "decoder" else None,
            "prompt_search": searched}


CONTENDERS = {
    "start-head": lambda s: start_head(s),
    "ort-infer-fp32": lambda s: ort_infer(s, "fp32"),
    "ort-infer-int8": lambda s: ort_infer(s, "int8"),
    "zo-fp32": lambda s: zoedge_zo(s, "fp32", learn=False),
    "zo-int8": lambda s: zoedge_zo(s, "int8", learn=s["learn"]),
    "zo-int8-q4-batched": lambda s: zoedge_zo(s, "int8-copies8", learn=False),
    "torch-mezo": lambda s: torch_mezo(s, learn=False),
    "torch-backprop": lambda s: torch_backprop(s, learn=s["learn"]),
    "ort-training": lambda s: ort_training(s),
}
