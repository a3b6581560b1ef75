"""Lever exploration on one k-shot split (issue 12): the numbers in docs/learning.md's "Levers" section.

  python -m bench.kshot_explore probe BUNDLE SPLIT_DIR          # plain and centred probes over an L2 grid
  python -m bench.kshot_explore train BUNDLE SPLIT_DIR OUT [--l2 30] [--no-floor] [--set lr=1e-3 --set steps=2000 ...]
                                                        [--mask MASKS.safetensors]  # ZO moves only the mask's entries
  python -m bench.kshot_explore gate BUNDLE SPLIT_DIR [SPLIT_DIR ...]  # the trainer's head start and its keep/drop call
  python -m bench.kshot_explore kept BUNDLE PATCH VAL_TSV      # a patch's paired gain over the exported tensors on val
  python -m bench.kshot_explore mix BUNDLE PATCH TEST_TSV      # predicted class counts: exported tensors vs the patch
  python -m bench.kshot_explore prior BUNDLE PATCH|lp SPLIT_DIR   # --unlabelled's bias shift on a patch (or on LP)
  python -m bench.kshot_explore unlabelled TASK K SEED [--sst2 DIR] [--rev GIT_REV]  # label mix of the unlabelled texts

SPLIT_DIR holds train.tsv / val.tsv / test.tsv (as `python -m bench.kshot run` writes them under out/kshot/splits).
`train` runs `zoedge train`'s Python API with the trainer's head-start L2 fixed to --l2 (0: the recipe's own choice)
and TrainConfig fields set by --set, selects on val.tsv as usual, and reports test.tsv accuracy once, at the end.
With --mask (bench/zo_mask.py writes one) every ZO direction is multiplied by the mask's 0/1 tensors, so only the
kept entries are perturbed and updated; the patch's trajectory then does not replay without the mask.
These are exploration runs on one seed, not the benchmark table: their test accuracies chose nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _probe(bundle_dir: str, split: Path) -> None:
    import numpy as np

    from zoedge.manifest import OUTPUT_FEATURES, OUTPUT_LOGITS
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.head_grad import head_names
    from zoedge.runtime.objectives import cross_entropy
    from zoedge.runtime.probe import fit_linear_probe

    b = Bundle.open(bundle_dir)
    m, t = b.manifest, b.initial_trainables()
    ev = Evaluator(b, open_forward(b, t), 16)
    ds = {n: load_dataset(split / f"{n}.tsv", m) for n in ("train", "val", "test")}
    out = {n: ev.outputs(d, (OUTPUT_FEATURES, OUTPUT_LOGITS)) for n, d in ds.items()}
    row = lambda logits: {n: [round(float((lg.argmax(1) == ds[n].labels).mean()), 4),  # noqa: E731
                              round(cross_entropy(lg, ds[n].labels), 4)] for n, lg in logits.items()}
    print(json.dumps({"head": "exported", **row({n: o[1] for n, o in out.items()})}))
    w_name, b_name = head_names(m)
    prior = (t[w_name], t[b_name] if b_name else np.zeros(len(m.labels), np.float32))
    for centred in (False, True):
        for l2 in (1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0):
            w, bias = fit_linear_probe(out["train"][0], ds["train"].labels, len(m.labels), l2=l2,
                                       prior=prior if centred else None)
            print(json.dumps({"head": "centred" if centred else "plain", "l2": l2,
                              **row({n: o[0] @ w.T + bias for n, o in out.items()})}))


def _masked_directions(path: Path):
    """A DirectionCache whose every z is multiplied, in place, by the 0/1 mask of its tensor (others untouched)."""
    from zoedge.runtime.tensors import load_tensors
    from zoedge.runtime.zo import DirectionCache

    masks = load_tensors(path)

    class Masked(DirectionCache):
        def _directions(self, run_seed, step, i, out=None):
            for name, z in super()._directions(run_seed, step, i, out):
                if name in masks:
                    z *= masks[name]
                yield name, z

    return Masked


def _train(bundle_dir: str, split: Path, out: Path, l2: float, sets: list[str], floor: bool = True,
           mask: Path | None = None) -> None:
    import zoedge.runtime.head_start as hs
    import zoedge.runtime.setup as run_setup
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.config import TrainConfig
    from zoedge.runtime.evaluate import predict
    from zoedge.runtime.evaluator import load_dataset
    from zoedge.runtime.loop import train
    from zoedge.runtime.patch import load_patch_tensors

    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in sets)}
    if l2 > 0:  # fixed L2 for every probe fit (the warm-start floor then applies on top for plain probes)
        hs.choose_l2 = lambda *a, **k: (l2, {})
    if not floor:  # the head start as it was before the warm-start floor (commit 8a01430)
        hs.PROBE_WARM_START_STRENGTH = 0.0
    if mask:
        run_setup.DirectionCache = _masked_directions(mask)
    r = train(bundle_dir, split / "train.tsv", out, TrainConfig(**over), eval_path=split / "val.tsv",
              log=lambda _m: None)
    b = Bundle.open(bundle_dir)
    if r.get("prompt_template"):
        b.encoder.template = r["prompt_template"]
    test = load_dataset(split / "test.tsv", b.manifest)
    acc = float((predict(b, load_patch_tensors(out, b.manifest), test.texts).argmax(1) == test.labels).mean())
    print(json.dumps({"l2": l2, **over, **({"mask": str(mask)} if mask else {}), "test_accuracy": round(acc, 4),
                      "val_accuracy": r["eval_accuracy"],
                      "val_accuracy_head_start": r["eval_accuracy_head_start"], "kept_step": r["steps"],
                      "kept_gain": r.get("kept_gain"),
                      "seconds": r["seconds"], "history": r["history"]}))


def _gate(bundle_dir: str, splits: list[Path]) -> None:
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.config import TrainConfig, resolve
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.head_start import head_start

    for split in splits:  # a fresh bundle per split: the head start sets its tensors and prompt in place
        b = Bundle.open(bundle_dir)
        m, t = b.manifest, b.initial_trainables()
        cfg = resolve(TrainConfig(), m)  # the default recipe's head-start settings
        ev = Evaluator(b, open_forward(b, t), cfg.batch_size)
        train, val = load_dataset(split / "train.tsv", m), load_dataset(split / "val.tsv", m)
        start, logits = ev.measure(val)
        said: list[str] = []
        hs = head_start(m, b, ev, train, t, cfg.lp_examples, cfg.seed, True, val, logits, said.append, cfg.select)
        print(json.dumps({"split": split.name, "start": start, "head_start": hs.metrics,
                          "kept": bool(hs.tensors), "log": said}))


def _kept(bundle_dir: str, patch: Path, val_path: Path) -> None:
    """What `--min-gain-se` reads, for a patch written before patches recorded it (kept_gain): the per-example gain
    of the patch over the exported tensors on the validation file, and its paired SE."""
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import Evaluator, load_dataset, paired_gain_of
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.patch import load_patch

    b = Bundle.open(bundle_dir)
    doc, patched = load_patch(patch, b.manifest)
    b.encoder.template = doc.prompt_template or b.encoder.template
    t = b.initial_trainables()
    ev, val = Evaluator(b, open_forward(b, t), 16), load_dataset(val_path, b.manifest)
    gain, se = paired_gain_of(ev, t, b.initial_trainables(), patched, val)
    print(json.dumps({"patch": str(patch), "step": doc.steps, "gain": gain, "se": se, "z": gain / se if se else None}))


def _mix(bundle_dir: str, patch: Path, data_path: Path) -> None:
    import numpy as np

    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluate import predict
    from zoedge.runtime.evaluator import load_dataset
    from zoedge.runtime.patch import load_patch

    b = Bundle.open(bundle_dir)
    data, (doc, patched) = load_dataset(data_path, b.manifest), load_patch(patch, b.manifest)
    exported = predict(b, b.initial_trainables(), data.texts).argmax(1)
    b.encoder.template = doc.prompt_template or b.encoder.template
    after = predict(b, {**b.initial_trainables(), **patched}, data.texts).argmax(1)
    count = lambda y: np.bincount(y, minlength=len(b.manifest.labels)).tolist()  # noqa: E731
    print(json.dumps({"labels": b.manifest.labels, "true": count(data.labels), "exported": count(exported),
                      "patch": count(after), "exported_accuracy": float((exported == data.labels).mean()),
                      "patch_accuracy": float((after == data.labels).mean())}))


def _prior(bundle_dir: str, patch: Path, split: Path) -> None:
    """What `zoedge train --unlabelled SPLIT_DIR/unlabelled.tsv` would have added to a patch written without it
    (runtime/prior.py on the patch's tensors), and the test accuracy and predicted class counts before and after.
    PATCH "lp": the LP contender's head instead (bench/kshot_cells.py: a plain probe on train, L2 by val CE)."""
    import numpy as np

    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.head_grad import head_names
    from zoedge.runtime.head_start import fit_probe_head
    from zoedge.runtime.patch import load_patch
    from zoedge.runtime.prior import adapt_prior

    b = Bundle.open(bundle_dir)
    m = b.manifest
    train, val, test = (load_dataset(split / f"{n}.tsv", m) for n in ("train", "val", "test"))
    if str(patch) == "lp":
        live = b.initial_trainables()
        ev = Evaluator(b, open_forward(b, live), 16)
        fit_probe_head(m, b, ev, train, live, len(train.texts), 0, [], lambda _m: None, eval_set=val, centred=False)
        patched = {t.name: live[t.name] for t in m.trainables if t.role == "head"}
    else:
        doc, patched = load_patch(patch, m)
        b.encoder.template = doc.prompt_template or b.encoder.template
        live = {**b.initial_trainables(), **{k: v.copy() for k, v in patched.items()}}
        ev = Evaluator(b, open_forward(b, live), 16)
    count = lambda logits: np.bincount(logits.argmax(1), minlength=len(m.labels)).tolist()  # noqa: E731
    before, before_logits = ev.measure(test)
    final = {k: v.copy() for k, v in live.items()}
    val_accuracy = ev.measure(val)[0]["accuracy"]  # the trainer's informativeness check reads the same
    record = adapt_prior(ev, live, final, head_names(m)[1], train.labels, split / "unlabelled.tsv", val, print,
                         val_accuracy)
    after, after_logits = ev.measure(test)
    print(json.dumps({"patch": str(patch), "labels": m.labels,
                      "true": np.bincount(test.labels, minlength=len(m.labels)).tolist(),
                      "test_accuracy": before["accuracy"], "test_accuracy_shifted": after["accuracy"],
                      "test_f1": before["f1"], "test_f1_shifted": after["f1"], "val_accuracy": val_accuracy,
                      "predicted": count(before_logits), "predicted_shifted": count(after_logits),
                      "head_is_exported": bool(np.array_equal(patched[head_names(m)[0]],
                                                              b.initial_trainables()[head_names(m)[0]])),
                      "label_prior": record}))


def _unlabelled(task_name: str, k: int, seed: int, sst2: str | None, rev: str | None) -> None:
    """The label mix of a k-shot split's unlabelled texts (read back from the pool's labels) against the rest of the
    pool, the pool and the test set, by `datasets.kshot` as it is or as it was at git revision `rev`; computed for
    every task, including those whose splits carry none (SST-2)."""
    import dataclasses
    import subprocess
    import sys
    import types
    from collections import Counter

    from bench import REPO
    from zoedge import datasets

    if rev:  # the module as it was, loaded under its own name (dataclasses look their module up in sys.modules)
        src = subprocess.run(["git", "show", f"{rev}:zoedge/datasets.py"], capture_output=True, text=True, check=True,
                             cwd=REPO).stdout
        datasets = types.ModuleType(f"datasets_at_{rev}")
        sys.modules[datasets.__name__] = datasets
        exec(compile(src, f"{rev}:zoedge/datasets.py", "exec"), datasets.__dict__)
    task = datasets.load_task(task_name, sst2)
    if hasattr(task, "pool_like_test"):
        task = dataclasses.replace(task, pool_like_test=True)
    split = datasets.kshot(task, k, seed)
    label = dict(task.pool)
    taken = {t for t, _ in split.train + split.val}

    def mix(labels: list[str]) -> dict:
        c = Counter(labels)
        return {name: round(c[name] / max(len(labels), 1), 4) for name in task.labels}

    print(json.dumps({"task": task_name, "k": k, "seed": seed, "rev": rev, "unlabelled": len(split.unlabelled),
                      "unlabelled_mix": mix([label[t] for t in split.unlabelled]),
                      "rest_of_pool_mix": mix([lb for t, lb in dict(task.pool).items() if t not in taken]),
                      "pool_mix": mix([lb for _, lb in task.pool]), "test_mix": mix([lb for _, lb in split.test])}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kshot_explore", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("bundle")
    p.add_argument("split", type=Path)
    t = sub.add_parser("train")
    t.add_argument("bundle")
    t.add_argument("split", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--l2", type=float, default=0.0)
    t.add_argument("--set", dest="sets", action="append", default=[], help="TrainConfig field=JSON value")
    t.add_argument("--no-floor", action="store_true", help="no warm-start L2 floor for a plain probe")
    t.add_argument("--mask", type=Path, help="0/1 tensors (bench/zo_mask.py): ZO moves only their kept entries")
    g = sub.add_parser("gate")
    g.add_argument("bundle")
    g.add_argument("splits", type=Path, nargs="+")
    k = sub.add_parser("kept")
    k.add_argument("bundle")
    k.add_argument("patch", type=Path)
    k.add_argument("val", type=Path)
    x = sub.add_parser("mix")
    x.add_argument("bundle")
    x.add_argument("patch", type=Path)
    x.add_argument("data", type=Path)
    r = sub.add_parser("prior")
    r.add_argument("bundle")
    r.add_argument("patch", type=Path, help="a patch directory, or lp")
    r.add_argument("split", type=Path)
    u = sub.add_parser("unlabelled")
    u.add_argument("task")
    u.add_argument("k", type=int)
    u.add_argument("seed", type=int)
    u.add_argument("--sst2", help="the SST-2 data directory (task sst2)")
    u.add_argument("--rev", help="use zoedge/datasets.py as it was at this git revision")
    a = ap.parse_args(argv)
    if a.cmd == "kept":
        _kept(a.bundle, a.patch, a.val)
    elif a.cmd == "prior":
        _prior(a.bundle, a.patch, a.split)
    elif a.cmd == "mix":
        _mix(a.bundle, a.patch, a.data)
    elif a.cmd == "probe":
        _probe(a.bundle, a.split)
    elif a.cmd == "gate":
        _gate(a.bundle, a.splits)
    elif a.cmd == "unlabelled":
        _unlabelled(a.task, a.k, a.seed, a.sst2, a.rev)
    else:
        _train(a.bundle, a.split, a.out, a.l2, a.sets, floor=not a.no_floor, mask=a.mask)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
