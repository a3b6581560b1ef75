"""Linear-probe head start: L2 x number of examples, on frozen features of a bundle (issue 8).

Features of train30k.tsv (file order; train2k/10k are its prefixes), dev.tsv[:2000] and test.tsv are
computed once and cached (the same cache files bench/learning.py uses). Fits probe.fit_linear_probe for
each (n, l2) and reports train CE, dev-2000 and test accuracy/CE. Writes bench/results/learning/lp_sweep.json.
  ZOEDGE_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/lp_sweep.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import RESULTS, SST2, ensure_bundle, ensure_data  # noqa: E402

from zoedge.manifest import OUTPUT_FEATURES  # noqa: E402
from zoedge.runtime import objectives  # noqa: E402
from zoedge.runtime.bundle import Bundle  # noqa: E402
from zoedge.runtime.engine import create_session  # noqa: E402
from zoedge.runtime.forward import BoundForward  # noqa: E402
from zoedge.runtime.probe import fit_linear_probe  # noqa: E402
from zoedge.runtime.evaluator import Evaluator, load_dataset  # noqa: E402

WORK = Path("/tmp/learn")


def features(ev: Evaluator, bundle_id: str, texts: list[str]) -> np.ndarray:
    key = hashlib.sha256((bundle_id + "\n".join(texts)).encode()).hexdigest()[:16]
    cache = WORK / "cache" / f"feat-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    t = time.perf_counter()
    (f,) = ev.outputs(texts, (OUTPUT_FEATURES,))
    print(f"  features of {len(texts)} texts: {time.perf_counter() - t:.0f}s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, f)
    return f


def main() -> None:
    bdir = ensure_bundle(WORK, sys.argv[1] if len(sys.argv) > 1 else "mini-lora8qv")
    b = Bundle.open(bdir)
    m = b.manifest
    ev = Evaluator(b, BoundForward(create_session(b.path, m), b.initial_trainables()))
    tr = load_dataset(ensure_data(WORK, "train30k"), m)
    dev = load_dataset(SST2 / "dev.tsv", m, 2000)
    te = load_dataset(SST2 / "test.tsv", m)
    ftr = {}
    # cache entries in the trainer's key format for the 2k / 10k / 30k files (file order when n <= lp_examples)
    for n in (2000, 10000, 30000):
        ftr[n] = features(ev, m.bundle_id, tr.texts[:n]) if n == 30000 or n == 2000 else None
    ftr[10000] = ftr[30000][:10000]
    np.save(WORK / "cache" / f"feat-{hashlib.sha256((m.bundle_id + chr(10).join(tr.texts[:10000])).encode()).hexdigest()[:16]}.npy", ftr[10000])
    fdev, fte = features(ev, m.bundle_id, dev.texts), features(ev, m.bundle_id, te.texts)
    rows = []
    for n in (2000, 10000, 30000):
        for l2 in (1e-3, 1e-2, 1e-1, 1.0):
            w, bias = fit_linear_probe(ftr[n], tr.labels[:n], 2, l2=l2)
            r = {"n": n, "l2": l2}
            for name, f, y in (("train", ftr[n], tr.labels[:n]), ("dev", fdev, dev.labels), ("dev500", fdev[:500], dev.labels[:500]),
                               ("test", fte, te.labels)):
                logits = f @ w.T + bias
                r[f"{name}_acc"] = round(objectives.accuracy(logits, y), 4)
                r[f"{name}_ce"] = round(objectives.cross_entropy(logits, y), 4)
            rows.append(r)
            print(r, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lp_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
