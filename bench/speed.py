"""Forward speed against the machine's limit (issue 18): every quantization scheme of a model side by side with
fp32, and each bundle's dense GEMM rate against the peak of a plain GEMM of the same precision, in one run.

Per model (bundles from the k-shot cache, bench/kshot_setup.py: SST-2 labels / label words, max length 128):
  - agreement: same predicted label as the fp32 bundle on the SST-2 test sentences (batch 16). Decoders read
    their initial trainables (zero-shot through the label words); encoders a linear-probe head fitted on fp32
    features of 1,000 train sentences and applied unchanged to every bundle (as bench.quant_encoders does);
  - accuracy on the same sentences, bundle MB;
  - forward ms at batch 16 over the first 4 test batches, all bundles of a model timed in interleaved rounds so a
    busy machine slows them alike (median);
  - roofline: dense GOP per forward (bench/roofline.py: 2*K*N per token for every weight GEMM, over the padded
    tokens) / the fastest forward, against gemm_peak (its fastest run) of the precision doing most of the bundle's
    work, measured in this process at the model's [tokens, hidden] x [hidden, intermediate] shape and thread count.
  - ZO steps per second: `zoedge train` for --zo-steps steps (batch 16, zo-sgd, no head start, no eval, no
    checkpoints; decoders keep the bundle's prompt) on the SST-2 k=16 seed-13 training split, its own reported
    seconds, at the same thread count.

  .venv/bin/python -m bench.speed [--models minilm,smollm2-135m] [--schemes fp32,int8,int8-smooth]
      [--threads 1] [--rounds 5] [--n 872] [--out bench/results/speed.json] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench import RESULTS, SST2
from bench.roofline import achieved, dense_ops_per_token, gemm_peak

SCHEMES = ("fp32", "int8", "int8-weight", "int8-smooth")
DECODER_ONLY = ("int8-weight", "int8-smooth")
PROBE_ROWS = 1000


def predictions(bundle, tensors: dict, texts: list[str], batch: int = 16) -> np.ndarray:
    from zoedge.runtime.evaluator import Evaluator
    from zoedge.runtime.forward import open_forward

    (logits,) = Evaluator(bundle, open_forward(bundle, tensors), batch).outputs(texts, ("logits",))
    return logits.argmax(1)


def probe_tensors(bundle, train_texts: list[str], train_labels: np.ndarray) -> dict:
    """An encoder's initial trainables with the head replaced by a linear probe on fp32 features."""
    from bench.quant_encoders import fit_head
    from zoedge.runtime.evaluator import Evaluator
    from zoedge.runtime.forward import open_forward

    init = bundle.initial_trainables()
    (feats,) = Evaluator(bundle, open_forward(bundle, init), 64).outputs(train_texts, ("features",))
    w, b, _ = fit_head(feats, train_labels)
    heads = [t.name for t in bundle.manifest.trainables if t.role == "head"]
    return {**init, **{k: np.ascontiguousarray(w if init[k].ndim == 2 else b, np.float32) for k in heads}}


def model_rows(model: str, schemes: list[str], data: Path, n: int, threads: int, rounds: int, cache: Path,
               log, peak_seconds: float = 1.0, zo_steps: int = 20) -> dict:
    from bench.kshot_setup import ensure_bundle, model_spec, split_files
    from bench.quant_encoders import time_forwards
    from zoedge import datasets
    from zoedge.export.quantize import resolve_mode
    from zoedge.runtime.bundle import Bundle

    spec, task = model_spec(model), datasets.load_task("sst2", data)
    if spec.kind == "encoder":  # the decoder schemes (MatMulNBits, the llama smoothing) are not for encoders
        schemes = [s for s in schemes if s not in DECODER_ONLY]
    fp32 = Bundle.open(ensure_bundle(cache, spec, task, "fp32", log=log)["path"])
    arch, bundles, seen = fp32.manifest.architecture, {"fp32": fp32}, {"fp32"}
    for s in schemes:  # a scheme that `int8` already resolves to is not exported and timed twice
        resolved = resolve_mode(s, arch)
        if resolved not in seen:
            seen.add(resolved)
            bundles[s] = Bundle.open(ensure_bundle(cache, spec, task, s, log=log)["path"])
    labels = fp32.manifest.labels
    test = task.test[:n]
    texts, gold = [t for t, _ in test], np.array([labels.index(y) for _, y in test])
    tensors = fp32.initial_trainables()
    if spec.kind == "encoder":
        train = task.pool[:PROBE_ROWS]
        tensors = probe_tensors(fp32, [t for t, _ in train], np.array([labels.index(y) for _, y in train]))
    rows, ref = {}, None
    for s, b in bundles.items():
        pred = predictions(b, tensors, texts)
        ref = pred if ref is None else ref
        m = b.manifest
        rows[s] = {"scheme": m.quantization_details.get("scheme", m.quantization), "bundle": str(b.path),
                   "bundle_mb": round(sum(p.stat().st_size for p in b.path.iterdir() if p.is_file()) / 1e6, 1),
                   "agreement_with_fp32": round(float(np.mean(pred == ref)), 4),
                   "accuracy": round(float(np.mean(pred == gold)), 4), "n": len(texts),
                   "ops_per_token": dense_ops_per_token(b.path / m.model_file)}
        log(f"speed: {model} {s}: agreement {rows[s]['agreement_with_fp32']:.4f} accuracy {rows[s]['accuracy']:.4f}")
    timing = time_forwards(bundles, tensors, texts, threads, rounds)
    starts = range(0, min(64, len(texts)), 16)  # the batches time_forwards times
    tokens = sum(int(np.prod(fp32.encoder(texts[i:i + 16])[0].shape)) for i in starts) // len(starts)
    cfg = _hidden_sizes(fp32)
    peaks = {p: gemm_peak(p, tokens, cfg[0], cfg[1], threads, peak_seconds) for p in ("fp32", "int8", "nbits")}
    base = timing["fp32"]["median_ms"]
    for s, r in rows.items():
        ms = timing[s]["min_ms"]  # against the GEMM's fastest run: both are the least disturbed by other load
        ops = r["ops_per_token"]
        main = max(ops, key=ops.get)  # the precision doing most of the work
        r.update(forward_ms=timing[s], speedup_vs_fp32=round(base / timing[s]["median_ms"], 2), tokens_per_forward=tokens,
                 gops=achieved(ops, tokens, ms), main_precision=main, peak_gops=peaks[main]["gops"])
        r["fraction_of_peak"] = round(r["gops"] / r["peak_gops"], 3)
    if zo_steps:
        train_file = split_files(cache.parent, task, 16, 13)["train"]
        for s, b in bundles.items():
            rows[s]["zo"] = zo_steps_per_s(b, train_file, zo_steps, threads, cache.parent / "speed")
            log(f"speed: {model} {s}: {rows[s]['zo']['steps_per_s']} ZO steps/s")
    return {"rows": rows, "gemm_peaks": peaks}


def zo_steps_per_s(bundle, train_file: str, steps: int, threads: int, work: Path) -> dict:
    """Steps per second of a plain `zoedge train` run (the CLI, in its own process, as a user runs it)."""
    import shutil
    import subprocess
    import sys

    from bench import thread_env

    out = work / f"zo-{bundle.path.name}"
    shutil.rmtree(out, ignore_errors=True)  # a scratch patch of this command's own
    work.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "zoedge", "train", str(bundle.path), "--data", train_file, "--out", str(out),
            "--steps", str(steps), "--head-init", "none", "--checkpoint-every", "0", "--json"]
    if bundle.manifest.prompt_template:
        args += ["--prompt", bundle.manifest.prompt_template]
    p = subprocess.run(args, capture_output=True, text=True, env=thread_env(threads))
    if p.returncode:
        raise SystemExit(f"speed: zoedge train failed on {bundle.path}: {p.stderr.strip().splitlines()[-1:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return {"steps": d["steps_run"], "seconds": d["seconds"], "steps_per_s": round(d["steps_run"] / d["seconds"], 3)}


def _hidden_sizes(bundle) -> tuple[int, int]:
    """(hidden, intermediate) of the model: the shape of its widest weight GEMM, read from the fp32 graph."""
    import onnx

    model = onnx.load(str(bundle.path / bundle.manifest.model_file), load_external_data=False)
    shapes = [tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 2]
    k, n = max((s for s in shapes if s[0] < s[1] and s[0] >= 64 and s[1] < 20000), key=lambda s: s[0] * s[1])
    return int(k), int(n)


def markdown(result: dict) -> str:
    lines = ["| model | scheme | MB | agreement with fp32 | accuracy | forward ms (batch 16, median) | x fp32 | "
             "GOP/s (fastest forward) | GEMM peak GOP/s (same precision) | of peak | ZO steps/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, r in result["models"].items():
        for s, row in r["rows"].items():
            lines.append(f"| {model} | {row['scheme']} | {row['bundle_mb']} | {100 * row['agreement_with_fp32']:.1f}% | "
                         f"{100 * row['accuracy']:.1f}% | {row['forward_ms']['median_ms']} | {row['speedup_vs_fp32']} | "
                         f"{row['gops']} | {row['peak_gops']} ({row['main_precision']}) | "
                         f"{100 * row['fraction_of_peak']:.0f}% | {row.get('zo', {}).get('steps_per_s', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2-135m,gemma3-270m")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="fp32 is always first: it is the reference")
    ap.add_argument("--data", type=Path, default=SST2)
    ap.add_argument("--n", type=int, default=872, help="test sentences for agreement and accuracy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    ap.add_argument("--zo-steps", type=int, default=20, help="steps of the ZO steps/s run (0: skip it)")
    ap.add_argument("--peak-seconds", type=float, default=1.0, help="timing budget of each plain-GEMM peak")
    ap.add_argument("--cache", type=Path, default=None, help="bundle cache (default: the k-shot bench's, out/kshot/bundles)")
    a = ap.parse_args(argv)
    os.environ["ZOEDGE_THREADS"] = str(a.threads)
    from bench.kshot_setup import WORK

    cache = a.cache or WORK / "bundles"
    schemes = ["fp32", *(s for s in a.schemes.split(",") if s and s != "fp32")]
    t0, load0 = time.perf_counter(), os.getloadavg()
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "threads": a.threads, "load_before": load0},
              "models": {m: model_rows(m, schemes, a.data, a.n, a.threads, a.rounds, cache, print, a.peak_seconds, a.zo_steps)
                         for m in a.models.split(",") if m}}
    result["machine"].update(load_after=os.getloadavg(), wall_s=round(time.perf_counter() - t0, 1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
