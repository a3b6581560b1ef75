"""Encoder int8 schemes on MiniLM (issue 13 item 7): speed, agreement with fp32, accuracy, size, batch dependence.

Exports `minilm` once per scheme (zoedge.export.bundle.export_bundle, as `zoedge export` does), fits one linear
probe head on fp32 features of the first 2,000 SST-2 train sentences (zoedge.runtime.probe, L2 chosen on a
held-out fifth) and evaluates every bundle with those same head tensors (LoRA B = 0) on the 872 test
sentences, the way `zoedge eval --batch-size B` does (consecutive slices of B, each padded to its longest row):
  - agreement: same predicted class as the fp32 bundle, at batch 1 (and at batch 64)
  - batch dependence: predictions that differ between batch 1 and batch 64, and max |logit difference|
  - noise: agreement under 5 heads fitted on disjoint 2,000-sentence slices of train (from features)
  - speed: forward ms at batch 16 (the first 4 test batches of 16), 1 and 2 intra-op threads, all bundles
    timed in interleaved rounds so a busy machine slows them alike; median and min per forward
Writes one JSON (default bench/results/quant_encoders.json). About 10 minutes on 2 cores.
  .venv/bin/python -m bench.quant_encoders [--data ../shared/data/sst2] [--work DIR] [--out FILE]
      [--model minilm] [--schemes fp32,int8,...] [--probe-rows 2000] [--rounds 10] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import RESULTS, SST2

PROBE_ROWS, NOISE_HEADS, CAL_ROWS = 2000, 5, 128  # the exporter reads at most 128 calibration rows
# key (--schemes): (name in the results, --quant, extra export options). int8 resolves to the encoder default
# (int8-token). fp32 is always run: it is the reference.
SCHEMES = {
    "fp32": ("fp32", "fp32", {}),
    "int8": ("int8 (int8-token)", "int8", {}),
    "int8-dynamic": ("int8-dynamic", "int8-dynamic", {}),
    "int8-weight": ("int8-weight (MatMulNBits 8 bit, block 32)", "int8-weight", {}),
    "int8-static": ("int8-static (built-in 16 sentences)", "int8-static", {}),
    "int8-static-cal": ("int8-static (128 train sentences, output.dense in float)", "int8-static",
                        {"calibration": "cal", "quant_exclude": r"output\.dense"}),
}


def load(path: Path, labels: list[str], limit: int | None = None):
    from zoedge.runtime.data import label_indices, read_examples

    ex = read_examples(path, need_labels=True, limit=limit)
    return ex.texts, np.asarray(label_indices(ex, labels, path), dtype=np.int64)


def outputs(bundle, fwd, texts: list[str], batch: int, name: str = "logits") -> np.ndarray:
    return np.concatenate([fwd(*bundle.encoder(texts[i:i + batch]), (name,))[0] for i in range(0, len(texts), batch)])


def export(model: str, out: Path, quant: str, extra: dict, cal_file: Path) -> float:
    from zoedge.export.bundle import ExportOptions, export_bundle

    opts = ExportOptions(model=model, out=out, quant=quant, force=True)
    for k, v in extra.items():
        setattr(opts, k, cal_file if v == "cal" else v)
    t = time.perf_counter()
    export_bundle(opts, log=lambda *_: None)
    return time.perf_counter() - t


def fit_head(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from zoedge.runtime.probe import choose_l2, fit_linear_probe

    l2, _ = choose_l2(features, labels, 2)
    w, b = fit_linear_probe(features, labels, 2, l2=l2)
    return w, b, l2


def time_forwards(bundles: dict, tensors: dict, texts: list[str], threads: int, rounds: int) -> dict[str, dict]:
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.forward import BoundForward

    fwds = {k: BoundForward(create_session(b.path, b.manifest, threads=threads), tensors) for k, b in bundles.items()}
    batches = {k: [b.encoder(texts[i:i + 16]) for i in range(0, min(64, len(texts)), 16)] for k, b in bundles.items()}
    for k, f in fwds.items():  # warm-up: weight prepacking, first allocations
        for ids, mask in batches[k]:
            f(ids, mask, ("logits",))
    ms: dict[str, list[float]] = {k: [] for k in fwds}
    for _ in range(rounds):
        for k, f in fwds.items():
            for ids, mask in batches[k]:
                t = time.perf_counter()
                f(ids, mask, ("logits",))
                ms[k].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": round(float(np.median(v)), 1), "min_ms": round(float(np.min(v)), 1), "n": len(v)}
            for k, v in ms.items()}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.quant_encoders", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SST2, help="SST-2 directory (train.tsv, test.tsv)")
    ap.add_argument("--work", type=Path, default=None, help="bundles go here (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=RESULTS / "quant_encoders.json")
    ap.add_argument("--model", default="minilm", help="the encoder to export (tiny-bert: smoke tests)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    ap.add_argument("--probe-rows", type=int, default=PROBE_ROWS, help="train rows per linear-probe head")
    ap.add_argument("--rounds", type=int, default=10, help="timing rounds (each times 4 batches per bundle)")
    ap.add_argument("--reuse", action="store_true", help="use the bundles already in WORK/<scheme> (not exported "
                                                         "again; nothing checks they are current)")
    return ap


def export_all(a: argparse.Namespace, work: Path, train_lines: list[str]) -> tuple[dict, dict]:
    """{name: Bundle}, {name: export seconds}; fp32 first. Calibration: train rows after the probes' rows."""
    from zoedge.runtime.bundle import Bundle

    keys = [k.strip() for k in a.schemes.split(",") if k.strip()]
    bad = set(keys) - set(SCHEMES)
    if bad:
        raise SystemExit(f"quant_encoders: bad --schemes {','.join(sorted(bad))}: choose from {', '.join(SCHEMES)}")
    cal_file = work / "calibration.tsv"  # never test sentences
    cal_file.write_text("\n".join([train_lines[0], *train_lines[1 + a.probe_rows * NOISE_HEADS:][:CAL_ROWS]]) + "\n")
    bundles, export_s = {}, {}
    for key in ["fp32", *(k for k in SCHEMES if k in keys and k != "fp32")]:
        name, quant, extra = SCHEMES[key]
        if a.reuse and (work / key / "manifest.json").is_file():
            bundles[name], export_s[name] = Bundle.open(work / key), None
            print(f"reused {name}: {work / key}", flush=True)
            continue
        secs = export(a.model, work / key, quant, extra, cal_file)
        bundles[name], export_s[name] = Bundle.open(work / key), round(secs, 1)
        print(f"exported {name}: {secs:.0f}s", flush=True)
    return bundles, export_s


def scheme_row(bundle, tensors: dict, test_texts, test_labels, heads: list, ref: dict) -> dict:
    """One bundle under the shared head: agreement with fp32 (`ref`; filled in from the fp32 bundle, which comes
    first), accuracy and batch dependence at batch 1, 16, 64, and agreement under the other heads."""
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.forward import BoundForward

    fwd = BoundForward(create_session(bundle.path, bundle.manifest, threads=2), tensors)
    logits = {bs: outputs(bundle, fwd, test_texts, bs) for bs in (1, 16, 64)}
    feats = outputs(bundle, fwd, test_texts, 1, "features")
    if not ref:
        ref.update(pred=logits[1].argmax(1), pred64=logits[64].argmax(1), feats=feats)
    pred = {bs: lg.argmax(1) for bs, lg in logits.items()}
    noise = [float(np.mean((feats @ hw.T + hb).argmax(1) == (ref["feats"] @ hw.T + hb).argmax(1)))
             for hw, hb, _ in heads]
    m = bundle.manifest
    return {
        "quant": m.quantization, "scheme": m.quantization_details.get("scheme", m.quantization),
        "bundle_mb": round(sum(p.stat().st_size for p in bundle.path.iterdir() if p.is_file()) / 1e6, 1),
        "agreement_with_fp32": round(float(np.mean(pred[1] == ref["pred"])), 4),
        "agreement_with_fp32_batch64": round(float(np.mean(pred[64] == ref["pred64"])), 4),
        "agreement_5_heads": [round(a, 4) for a in noise],
        "accuracy": {str(bs): round(float(np.mean(p == test_labels)), 4) for bs, p in pred.items()},
        "batch1_vs_64_changed": int(np.sum(pred[1] != pred[64])),
        "batch1_vs_16_changed": int(np.sum(pred[1] != pred[16])),
        "batch1_vs_64_max_abs_logit_diff": float(np.abs(logits[1] - logits[64]).max()),
        "quantization_details": m.quantization_details,
    }


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from zoedge.runtime.engine import create_session
    from zoedge.runtime.forward import BoundForward

    work = a.work or Path(tempfile.mkdtemp(prefix="zoedge-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    bundles, export_s = export_all(a, work, (a.data / "train.tsv").read_text().splitlines())
    fp32 = bundles["fp32"]
    labels = fp32.manifest.labels
    test_texts, test_labels = load(a.data / "test.tsv", labels)
    n = a.probe_rows
    tr_texts, tr_labels = load(a.data / "train.tsv", labels, n * NOISE_HEADS)
    init = fp32.initial_trainables()
    fwd32 = BoundForward(create_session(fp32.path, fp32.manifest, threads=2), init)
    f_train = outputs(fp32, fwd32, tr_texts, 64, "features")
    heads = [fit_head(f_train[i * n:(i + 1) * n], tr_labels[i * n:(i + 1) * n]) for i in range(NOISE_HEADS)]
    w, b, l2 = heads[0]
    head_names = [t.name for t in fp32.manifest.trainables if t.role == "head"]
    tensors = {**init, **{k: np.ascontiguousarray(w if init[k].ndim == 2 else b, np.float32) for k in head_names}}

    rows, ref = {}, {}
    for name, bundle in bundles.items():
        rows[name] = {**scheme_row(bundle, tensors, test_texts, test_labels, heads, ref), "export_s": export_s[name]}
        print(name, {k: v for k, v in rows[name].items() if k != "quantization_details"}, flush=True)

    speed = {}
    for threads in (1, 2):
        speed[threads] = time_forwards(bundles, tensors, test_texts, threads, a.rounds)
        for name, s in speed[threads].items():
            rows[name][f"forward_ms_batch16_{threads}t"] = s
            print(f"{threads} thread(s) {name}: {s}", flush=True)
    for name in rows:
        for threads in (1, 2):
            base = speed[threads]["fp32"]["median_ms"]
            rows[name][f"speedup_vs_fp32_{threads}t"] = round(base / speed[threads][name]["median_ms"], 2)

    import onnxruntime

    n_cal = NOISE_HEADS * n
    result = {
        "model": a.model, "test": f"SST-2 test.tsv ({len(test_texts)})", "head": {
            "fit": f"zoedge.runtime.probe linear probe on fp32 features of train.tsv rows 1-{n}", "l2": l2,
            "fp32_accuracy": rows["fp32"]["accuracy"]["1"]},
        "noise_heads": f"{NOISE_HEADS} heads fitted on disjoint {n}-row slices of train.tsv (fp32 features)",
        "calibration_file": f"train.tsv rows {1 + n_cal}-{n_cal + CAL_ROWS}",
        "timing": f"batch 16 = test sentences 1-64 in 4 batches; {a.rounds} interleaved rounds; median / min ms",
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared 2-core machine, other jobs running: times are indicative"},
        "wall_s": round(time.perf_counter() - t_all), "schemes": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
