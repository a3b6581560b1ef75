"""Linear-probe head start: L2 x number of examples, on frozen features of a bundle (issue 8; docs/learning.md §1).

The training examples are the first N rows of a seed-0 shuffle of SST-2 train.tsv (as the removed
bench/learning.py made train2k / 10k / 30k); features of the largest N, of the first --dev-rows of dev.tsv
and of test.tsv are computed once and cached in WORK. Fits zoedge.runtime.probe.fit_linear_probe for each
(N, L2) and reports train, dev and test accuracy / cross-entropy. Without --bundle it exports --model with
LoRA + head at --quant (int8-dynamic: what the docs' table was measured on) into WORK, once.
  ZOEDGE_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python -m bench.lp_sweep [--bundle DIR] [--data ../shared/data/sst2]
      [--examples 2000,10000,30000] [--l2 1e-3,1e-2,1e-1,1] [--dev-rows 2000] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import RESULTS, SST2, WORK


def shuffled_train(data: Path, work: Path, n: int) -> Path:
    """The first n rows of a seed-0 shuffle of data/train.tsv, as a TSV in work (written once)."""
    p = work / "data" / f"train-shuffle0-{n}.tsv"
    if not p.is_file():
        lines = (data / "train.tsv").read_text().splitlines()
        rows = lines[1:]
        random.Random(0).shuffle(rows)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join([lines[0]] + rows[:n]) + "\n")
    return p


def ensure_bundle(work: Path, model: str, quant: str) -> Path:
    p = work / "bundles" / f"{model}-lora-head-{quant}"
    if not (p / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "zoedge", "export", model, "--trainable", "lora,head", "--quant", quant,
                        "--out", str(p), "--force"], check=True, stdout=subprocess.DEVNULL)
    return p


def features(ev, bundle_id: str, texts: list[str], cache: Path) -> np.ndarray:
    from zoedge.manifest import OUTPUT_FEATURES

    key = hashlib.sha256((bundle_id + "\n".join(texts)).encode()).hexdigest()[:16]
    f = cache / f"feat-{key}.npy"
    if f.is_file():
        return np.load(f)
    t = time.perf_counter()
    (out,) = ev.outputs(texts, (OUTPUT_FEATURES,))
    print(f"  features of {len(texts)} texts: {time.perf_counter() - t:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, out)
    return out


def sweep(bundle_dir: Path, data: Path, work: Path, examples: list[int], l2s: list[float], dev_rows: int) -> list[dict]:
    from zoedge.runtime import objectives
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import BoundForward
    from zoedge.runtime.probe import fit_linear_probe

    b = Bundle.open(bundle_dir)
    m = b.manifest
    ev = Evaluator(b, BoundForward(create_session(b.path, m), b.initial_trainables()))
    tr = load_dataset(shuffled_train(data, work, max(examples)), m)
    dev, te = load_dataset(data / "dev.tsv", m, dev_rows), load_dataset(data / "test.tsv", m)
    cache = work / "cache"
    ftr = features(ev, m.bundle_id, tr.texts, cache)  # the largest N: the smaller are its prefixes
    fdev, fte = features(ev, m.bundle_id, dev.texts, cache), features(ev, m.bundle_id, te.texts, cache)
    k = len(m.labels)
    rows = []
    for n in examples:
        for l2 in l2s:
            w, bias = fit_linear_probe(ftr[:n], tr.labels[:n], k, l2=l2)
            r = {"n": n, "l2": l2}
            for name, f, y in (("train", ftr[:n], tr.labels[:n]), ("dev", fdev, dev.labels),
                               ("dev500", fdev[:500], dev.labels[:500]), ("test", fte, te.labels)):
                logits = f @ w.T + bias
                r[f"{name}_acc"] = round(objectives.accuracy(logits, y), 4)
                r[f"{name}_ce"] = round(objectives.cross_entropy(logits, y), 4)
            rows.append(r)
            print(r, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.lp_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a classify bundle (default: export --model into WORK)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--quant", default="int8-dynamic")
    ap.add_argument("--data", type=Path, default=SST2, help="SST-2 directory (train.tsv, dev.tsv, test.tsv)")
    ap.add_argument("--examples", default="2000,10000,30000", help="comma-separated numbers of training examples")
    ap.add_argument("--l2", default="1e-3,1e-2,1e-1,1", help="comma-separated L2 strengths")
    ap.add_argument("--dev-rows", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=WORK / "lp_sweep", help="bundle, data subsets, feature cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "learning" / "lp_sweep.json")
    a = ap.parse_args(argv)
    bundle = a.bundle or ensure_bundle(a.work, a.model, a.quant)
    rows = sweep(bundle, a.data, a.work, [int(x) for x in a.examples.split(",")], [float(x) for x in a.l2.split(",")],
                 a.dev_rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
