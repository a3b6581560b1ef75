"""Learning ablations for zoedge ZO fine-tuning on SST-2 (issue 8).

Runs named recipes through the Python API (`zoedge.runtime.trainer.train`), one at a time, and writes
  bench/results/learning/<recipe>.json   one file per run (config, timings, dev curve, test accuracy)
  bench/results/learning/table.md        the ablation table regenerated from every JSON present

Selection is by dev (first --eval-limit rows of dev.tsv); test.tsv (872 = GLUE dev) is only reported.
Run with one thread and one process at a time:
  ZOEDGE_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py r8-base r8-l2e-1 ...
  .venv/bin/python bench/learning.py --list        # recipe names
  .venv/bin/python bench/learning.py --table       # only regenerate the table

Bundles are exported on first use into --work/bundles with the `zoedge export` CLI. Training subsets
(train2k/10k/30k.tsv: a seed-0 shuffle of train.tsv) are made on first use into --work/data.
Bench-only knobs (no runtime change): `lp_l2` replaces the linear probe's L2 (probe.py has 1e-3), and
the probe's frozen features are cached per (bundle, file, examples) so repeated LP starts are free.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "learning"
SST2 = Path("/work/shared/data/sst2")
TEST_BATCH = 16  # int8 dynamic quantization makes logits depend on batch mates: pin the eval batch

# bundle name -> `zoedge export` arguments
BUNDLES = {
    "mini-lora8qv": ["minilm", "--trainable", "lora,head"],
    "mini-lora1qv": ["minilm", "--trainable", "lora,head", "--lora-rank", "1"],
    "mini-lora8all": ["minilm", "--trainable", "lora,head", "--lora-targets", "q,k,v,o"],
    "mini-head": ["minilm", "--trainable", "head"],
    "mini-bias": ["minilm", "--trainable", "bias,head"],
    "smol-lorahead": ["smollm2-135m", "--trainable", "lora,head"],
}


def R(bundle: str, train: str = "train2k", lp_l2: float = 1e-3, lp_fix: bool = False, **cfg) -> dict:
    """A recipe: bundle, training file, probe L2, probe fix (drop near-constant features), TrainConfig overrides."""
    base = {"steps": 500, "batch_size": 16, "eval_limit": 500, "seed": 0}
    return {"bundle": bundle, "train": train, "lp_l2": lp_l2, "lp_fix": lp_fix, "cfg": {**base, **cfg}}


MINI = "mini-lora8qv"
BIG = {"train": "train30k", "lp_examples": 30000}  # LP + ZO on 30k phrases (the LP sweep's best head start)


def B(bundle: str = MINI, lp_l2: float = 1e-3, lp_fix: bool = False, **cfg) -> dict:
    return R(bundle, BIG["train"], lp_l2, lp_fix, **{"lp_examples": BIG["lp_examples"], "lr": 1e-4, "eps": 1e-2, **cfg})


RECIPES: dict[str, dict] = {
    # --- head start: LP regularisation and LP data (LoRA r8 q,v + head, lr 1e-4, eps 1e-2, zo-sgd)
    "r8-base": R(MINI, lr=1e-4, eps=1e-2),
    "r8-l2e-2": R(MINI, lp_l2=1e-2, lr=1e-4, eps=1e-2),
    "r8-l2e-1": R(MINI, lp_l2=1e-1, lr=1e-4, eps=1e-2),
    "r8-10k": R(MINI, train="train10k", lp_examples=10000, lr=1e-4, eps=1e-2),
    "r8-30k": B(),
    # --- estimator on the 30k head start (LoRA r8 q,v + head)
    "r8-30k-lr1e-3": B(lr=1e-3),
    "r8-30k-lr3e-3": B(lr=3e-3),
    "r8-30k-lr1e-3-eps1e-1": B(lr=1e-3, eps=1e-1),
    "r8-30k-lr1e-3-eps1e-3": B(lr=1e-3, eps=1e-3),
    "r8-30k-adam1e-4": B(optimizer="zo-adam", lr=1e-4),
    "r8-30k-adam1e-3": B(optimizer="zo-adam", lr=1e-3),
    "r8-30k-mom": B(optimizer="zo-momentum", lr=1e-4),
    "r8-30k-q4": B(lr=1e-3, perturbations=4),
    "r8-30k-b64": B(lr=1e-3, batch_size=64),
    "r8-30k-acc": B(lr=1e-3, objective="accuracy"),
    # --- what to train (30k head start)
    "head-30k": B("mini-head", lr=1e-3),
    "head-30k-lr1e-2": B("mini-head", lr=1e-2),
    "bias-30k": B("mini-bias", lr=1e-3),
    "r1-30k": B("mini-lora1qv", lr=1e-3),
    "r8all-30k": B("mini-lora8all", lr=1e-3),
    # --- probe fix: zero the LP weight of near-constant features (else |w| = 2381 on one MiniLM feature)
    "fix-r8-30k": B(lp_fix=True),
    "fix-r8-30k-lr1e-3": B(lp_fix=True, lr=1e-3),
    "fix-r8-30k-lr3e-3": B(lp_fix=True, lr=3e-3),
    "fix-bias-30k": B("mini-bias", lp_fix=True, lr=1e-3),
    "fix-bias-30k-lr1e-2": B("mini-bias", lp_fix=True, lr=1e-2),
    "fix-bias-30k-s1": B("mini-bias", lp_fix=True, lr=1e-3, seed=1),
    "fix-r8all-30k": B("mini-lora8all", lp_fix=True, lr=1e-3),
    "fix-r8-2k": R(MINI, lp_fix=True, lr=1e-3, eps=1e-2),
    "fix-r1-30k-lr3e-3": B("mini-lora1qv", lp_fix=True, lr=3e-3),
    "fix-r1-30k-lr1e-2": B("mini-lora1qv", lp_fix=True, lr=1e-2),
    "fix-r8-30k-q4": B(lp_fix=True, lr=1e-3, perturbations=4, steps=250),
    "fix-r8-30k-b64": B(lp_fix=True, lr=1e-3, batch_size=64, steps=250),
    # --- long confirmations (dev eval on 1000 rows)
    "long-r8-30k-lr1e-4": B(steps=5000, lr=1e-4, eval_limit=1000),
    "long-r8-30k-lr3e-4": B(steps=5000, lr=3e-4, eval_limit=1000),
    "long-fix-r8-30k-lr1e-3": B(lp_fix=True, steps=5000, lr=1e-3, eval_limit=1000),
    "long-fix-r8-30k-lr2e-4": B(lp_fix=True, steps=3000, lr=2e-4, eval_limit=1000),
    # --- SmolLM2-135M int8, prompt "Review: {sentence}\nSentiment:" -> " negative"/" positive", LoRA r8 q,v + label head
    "smol-zs": R("smol-lorahead", "train30k", steps=300, lr=1e-4, eps=1e-2, head_init="none"),
    "smol-lp": R("smol-lorahead", "train30k", lp_l2=1e-2, steps=200, lr=1e-4, eps=1e-2, head_init="lp", lp_examples=2000),
}


def extra(name: str, recipe: dict) -> None:
    RECIPES[name] = recipe


# ---- helpers -----------------------------------------------------------------------------------


def ensure_data(work: Path, name: str) -> Path:
    if name in ("train", "dev", "test"):
        return SST2 / f"{name}.tsv"
    p = work / "data" / f"{name}.tsv"
    if not p.is_file():
        lines = (SST2 / "train.tsv").read_text().splitlines()
        rows = lines[1:]
        random.Random(0).shuffle(rows)
        n = int(name.removeprefix("train").removesuffix("k")) * 1000
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join([lines[0]] + rows[:n]) + "\n")
    return p


def ensure_bundle(work: Path, name: str) -> Path:
    p = work / "bundles" / name
    if not (p / "manifest.json").is_file():
        cmd = [str(ROOT / ".venv" / "bin" / "zoedge"), "export", *BUNDLES[name], "--quant", "int8", "--out", str(p)]
        subprocess.run(cmd, check=True)
    return p


def fit_probe_no_intercept(x: np.ndarray, labels: np.ndarray, k: int, l2: float, iters: int = 500, lr: float = 0.5):
    """probe.fit_linear_probe without the intercept (scale-only standardisation), for heads with no bias.

    probe.fit_linear_probe centres the features and folds the mean into a bias; the trainer drops that
    bias when the head has none (SmolLM2's label head), which shifts every logit by an arbitrary amount."""
    x = x.astype(np.float64)
    sd = np.sqrt((x ** 2).mean(0)) + 1e-6
    xs = x / sd
    y = np.eye(k)[labels]
    w = np.zeros((x.shape[1], k))
    for _ in range(iters):
        z = xs @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        w -= lr * (xs.T @ ((p - y) / len(x)) + l2 * w)
    return (w / sd[:, None]).T.astype(np.float32), np.zeros(k, np.float32)


def install_probe(work: Path, l2: float, fix: bool = False) -> None:
    """Swap the trainer's linear probe for one with `l2` and a feature cache (bench only)."""
    from zoedge.manifest import OUTPUT_FEATURES
    from zoedge.runtime import probe, trainer

    def _linear_probe(m, evaluator, data, tensors, limit, seed):
        n = len(data.texts)
        idx = np.random.Generator(np.random.PCG64(seed)).permutation(n)[:limit] if n > limit else np.arange(n)
        texts = [data.texts[i] for i in idx]
        key = hashlib.sha256((m.bundle_id + "\n".join(texts)).encode()).hexdigest()[:16]
        cache = work / "cache" / f"feat-{key}.npy"
        if cache.is_file():
            features = np.load(cache)
        else:
            (features,) = evaluator.outputs(texts, (OUTPUT_FEATURES,))
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, features)
        if fix:  # near-constant features (MiniLM has sd ~1e-9 dims) would get weights ~1e3 after un-standardising
            sd = features.std(0)
            features = features.copy()
            features[:, sd < 1e-3 * np.median(sd)] = 0.0
        head = [t for t in m.trainables if t.role == "head"]
        if all(len(t.shape) == 2 for t in head):  # no bias tensor (decoder label head): fit without intercept
            w, b = fit_probe_no_intercept(features, data.labels[idx], len(m.labels), l2=l2)
        else:
            w, b = probe.fit_linear_probe(features, data.labels[idx], len(m.labels), l2=l2)
        start = {}
        for t in (t for t in m.trainables if t.role == "head"):
            np.copyto(tensors[t.name], (w if len(t.shape) == 2 else b).astype(np.float32))
            start[t.name] = tensors[t.name].copy()
        return start

    trainer._linear_probe = _linear_probe


def test_accuracy(bundle_dir: Path, tensors: dict, test: Path) -> float:
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.forward import BoundForward
    from zoedge.runtime.trainer import Evaluator, load_dataset

    b = Bundle.open(bundle_dir)
    fwd = BoundForward(create_session(b.path, b.manifest), tensors)
    return Evaluator(b, fwd, batch=TEST_BATCH)(load_dataset(test, b.manifest))["accuracy"]


def run(name: str, work: Path, force: bool = False) -> dict:
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.patch import START_FILE, load_patch_tensors
    from zoedge.runtime.tensors import load_tensors
    from zoedge.runtime.trainer import TrainConfig, train

    rec = RECIPES[name]
    out_json = RESULTS / f"{name}.json"
    if out_json.is_file() and not force:
        print(f"{name}: exists, skipping (use --force)")
        return json.loads(out_json.read_text())
    bundle_dir = ensure_bundle(work, rec["bundle"])
    data = ensure_data(work, rec["train"])
    install_probe(work, rec["lp_l2"], rec.get("lp_fix", False))
    cfg = TrainConfig(**rec["cfg"])
    out = work / "runs" / name
    if out.exists():
        import shutil
        shutil.rmtree(out)
    times: dict[int, float] = {}
    t0 = time.perf_counter()

    losses: dict[int, float] = {}

    def on_step(r):
        times[r["step"]] = time.perf_counter() - t0
        losses[r["step"]] = r["loss"]

    res = train(bundle_dir, data, out, cfg, eval_path=SST2 / "dev.tsv", on_step=on_step, log=lambda s: print(f"  {s}"))
    train_s = time.perf_counter() - t0
    m = Bundle.open(bundle_dir).manifest
    init = Bundle.open(bundle_dir).initial_trainables()
    test = SST2 / "test.tsv"
    acc_init = test_accuracy(bundle_dir, init, test)
    acc_head = None
    if (out / START_FILE).is_file():
        acc_head = test_accuracy(bundle_dir, {**init, **load_tensors(out / START_FILE)}, test)
    acc_end = test_accuracy(bundle_dir, load_patch_tensors(out, m), test)
    q = rec["cfg"].get("perturbations", 1)
    curve, prev = [], 0
    for h in res["history"]:  # dev accuracy + mean train minibatch loss since the previous eval
        seg = [v for k, v in losses.items() if prev < k <= h["step"]]
        curve.append({"step": h["step"], "seconds": round(times.get(h["step"], 0.0), 2), "dev": h["eval_accuracy"],
                      "train_loss": round(float(np.mean(seg)), 4) if seg else None})
        prev = h["step"]
    doc = {
        "recipe": name, **rec, "model": m.model_id,
        "trainable": sorted({t.role.split("_")[0] for t in m.trainables}), "trainable_values": m.num_trainable,
        "steps_run": res["steps_run"], "best_step": res["steps"], "seconds": round(train_s, 1),
        "train_forwards": 2 * q * res["steps_run"], "forward_calls": res["forward_passes"],
        "rollbacks": res["rollbacks"], "peak_rss_mb": res["peak_rss_mb"],
        "dev_start": res["eval_accuracy_start"], "dev_head": res["eval_accuracy_head_start"],
        "dev_end": res["eval_accuracy"], "test_start": acc_init, "test_head": acc_head, "test_end": acc_end,
        "curve": curve,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(f"{name}: dev {doc['dev_head'] or doc['dev_start']:.3f} -> {doc['dev_end']:.3f}, test "
          f"{acc_init:.3f} / {acc_head if acc_head is not None else float('nan'):.3f} -> {acc_end:.3f}, "
          f"{train_s:.0f}s, best step {res['steps']}/{res['steps_run']}")
    return doc


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table() -> str:
    rows = [d for p in sorted(RESULTS.glob("*.json")) if isinstance(d := json.loads(p.read_text()), dict) and "recipe" in d]
    hdr = ("| recipe | model | trained (values) | train data / LP l2 | estimator | steps (best) | fwd passes | "
           "wall s | test start → head → end | dev (eval_limit rows) head → end |\n|" + "---|" * 10)
    lines = [hdr]
    for d in rows:
        c = d["cfg"]
        if "error" in d:
            lines.append(f"| {d['recipe']} | {d['bundle']} | | {d['train']} / {d['lp_l2']:g} | lr {c.get('lr')} eps "
                         f"{c.get('eps')} | failed: {d['error'][:60]} |||||")
            continue
        est = (f"{c.get('optimizer', 'zo-sgd')} lr {c.get('lr')} eps {c.get('eps')} q {c.get('perturbations', 1)} "
               f"b {c.get('batch_size')} {c.get('objective') or 'ce'} {c.get('lr_schedule', 'constant')}"
               + (f" wd {c['weight_decay']}" if c.get("weight_decay") else ""))
        lines.append(
            f"| {d['recipe']} | {d['model']} | {'+'.join(sorted({t.split('_')[0] for t in d['trainable']}))} ({d['trainable_values']:,}) | "
            f"{d['train']} / {d['lp_l2']:g}{' fix' if d.get('lp_fix') else ''} | {est} | {d['steps_run']} ({d['best_step']}) | {d['train_forwards']} | "
            f"{d['seconds']:.0f} | {_pct(d['test_start'])} → {_pct(d['test_head'])} → **{_pct(d['test_end'])}** | "
            f"{_pct(d['dev_head'] or d['dev_start'])} → {_pct(d['dev_end'])} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "table.md").write_text(text)
    return text


def plot(names: list[str], path: Path) -> None:
    """Dev accuracy vs wall-clock (seconds since the run began, LP head start included) for some recipes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n in names:
        d = json.loads((RESULTS / f"{n}.json").read_text())
        if "curve" not in d:
            continue
        xs = [c["seconds"] for c in d["curve"]]
        ys = [100 * c["dev"] for c in d["curve"]]
        line, = ax.plot(xs, ys, marker=".", label=f"{n} ({d['model']}, dev-{d['cfg']['eval_limit']})")
        ax.scatter([xs[-1]], [100 * d["test_end"]], marker="*", s=90, color=line.get_color())
    ax.set_xlabel("wall-clock seconds (1 thread; LP head start at t=0 point)")
    ax.set_ylabel("accuracy %  (line: dev, star: test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--work", type=Path, default=Path("/tmp/learn"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", nargs="+", metavar="RECIPE", help="plot these recipes' dev curves to --plot-out")
    ap.add_argument("--plot-out", type=Path, default=ROOT / "docs" / "learning_curves.png")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(RECIPES))
        return
    if a.plot:
        plot(a.plot, a.plot_out)
        return
    for r in a.recipes:
        if r not in RECIPES:
            sys.exit(f"unknown recipe {r!r} (see --list)")
    for r in a.recipes:
        try:
            run(r, a.work, a.force)
        except Exception as e:  # a diverged recipe is a result too: keep it in the table
            print(f"{r}: FAILED {e}")
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{r}.json").write_text(json.dumps({"recipe": r, **RECIPES[r], "error": str(e)}, indent=1))
        table()
    print(table())


if __name__ == "__main__":
    main()
