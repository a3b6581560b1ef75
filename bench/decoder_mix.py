"""Which decoder MatMuls can run on the integer GEMM (issue 18): candidate schemes built from one fp32 bundle's
graph, each scored by agreement with the fp32 bundle on SST-2 sentences (zero-shot through the label words,
batch 16, deterministic) and by the spread of its label-margin error. No bundle is written: each candidate is a
model file in --work, run through the bundle's own tokenizer, prompt and trainables.

A candidate is NAME=key:value;key:value with keys
  alpha    SmoothQuant migration strength (zoedge/export/smooth.py); 'none' skips smoothing
  float    regex over source module paths kept as fp32 MatMuls (e.g. 'down_proj|layers\\.(0|29)\\.')
  calib    builtin (the export's 16 sentences) or sst2 (the first 128 SST-2 train sentences)
  explicit 1: also smooth the attention input and o_proj's input through an inserted Mul (smooth.py)
  fakew    1: no integer GEMM; the weights are rounded to per-channel int8 in the fp32 graph (weight error only)

  .venv/bin/python -m bench.decoder_mix BUNDLE 'smooth=alpha:0.5' 'noattn=alpha:0.5;float:self_attn' \
      [--n 872] [--split test|pool] [--work out/decoder_mix] [--out bench/results/decoder_mix.jsonl] [--time ROUNDS]
(options after the candidates). Rows of bench/results/decoder_mix.jsonl with `resid` / `aresid` keys came from a
residual-GEMM option tried on 2026-12-01 and removed (it did not help; docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench import RESULTS, SST2, WORK

CALIBRATION_ROWS = 128


def parse(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition("=")
    opts = {"alpha": "0.5", "float": "", "calib": "builtin", "explicit": "", "fakew": ""}
    for part in filter(None, body.split(";")):
        k, _, v = part.partition(":")
        if k not in opts:
            raise SystemExit(f"decoder_mix: unknown key {k!r} in {spec!r}")
        opts[k] = v
    return name, opts


def calibration_feeds(bundle, tensors: dict, source: str) -> list[dict]:
    from zoedge import datasets
    from zoedge.export.bundle import BUILTIN_CALIBRATION

    texts = (list(BUILTIN_CALIBRATION) if source == "builtin"
             else [t for t, _ in datasets.load_task("sst2", SST2).pool[:CALIBRATION_ROWS]])
    return [{**dict(zip(("input_ids", "attention_mask"), bundle.encoder(texts[i:i + 16]))), **tensors}
            for i in range(0, len(texts), 16)]


def build(bundle, tensors: dict, opts: dict, dst: Path) -> dict:
    """The candidate's model file at dst (smoothing, then per-token int8 of every MatMul not kept in float)."""
    import onnx

    from zoedge.export.quantize import nodes_matching, per_token_int8, token_targets, trainable_path_nodes
    from zoedge.export.smooth import smooth

    model = onnx.load(str(bundle.path / bundle.manifest.model_file))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    excluded = trainable_path_nodes(model, list(tensors))
    kept = [n for n in nodes_matching(model, opts["float"]) if n not in excluded] if opts["float"] else []
    excluded += kept
    targets = [n.name for n in token_targets(model, excluded)]
    details = {"float_matmuls": len([n for n in model.graph.node if n.name in set(kept) and n.op_type == "MatMul"])}
    if opts["alpha"] != "none":
        details.update(smooth(model, targets, calibration_feeds(bundle, tensors, opts["calib"]), float(opts["alpha"]),
                              bool(opts["explicit"])))
    if opts["fakew"]:
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}
        for w in {n.input[1] for n in token_targets(model, excluded)}:
            a = numpy_helper.to_array(inits[w]).astype(np.float32)
            scale = np.where(np.abs(a).max(0) > 0, np.abs(a).max(0) / 127, 1.0).astype(np.float32)
            inits[w].CopyFrom(numpy_helper.from_array(np.clip(np.round(a / scale), -127, 127) * scale, w))
        onnx.save(model, str(dst))
        return {**details, "quantized_matmuls": 0}
    details.update(per_token_int8(model, dst, excluded))
    return details


def logits_of(bundle, model_file: Path, tensors: dict, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    from zoedge.runtime.evaluator import Evaluator
    from zoedge.runtime.forward import BoundForward

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
    (logits,) = Evaluator(bundle, BoundForward(sess, tensors), 16).outputs(texts, ("logits",))
    return logits


def forward_ms(bundle, files: dict[str, Path], tensors: dict, texts: list[str], rounds: int) -> dict:
    """Median ms of a batch-16 forward per model file, over the first 4 test batches, files interleaved per round."""
    import onnxruntime as ort

    from zoedge.runtime.forward import BoundForward

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    fwds = {k: BoundForward(ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"]), tensors)
            for k, f in files.items()}
    batches = [bundle.encoder(texts[i:i + 16]) for i in range(0, 64, 16)]
    for f in fwds.values():
        for ids, mask in batches:
            f(ids, mask, ("logits",))
    ms: dict[str, list[float]] = {k: [] for k in fwds}
    for _ in range(rounds):
        for k, f in fwds.items():
            for ids, mask in batches:
                t = time.perf_counter()
                f(ids, mask, ("logits",))
                ms[k].append(1000 * (time.perf_counter() - t))
    return {k: round(float(np.median(v)), 1) for k, v in ms.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decoder_mix", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="the fp32 decoder bundle")
    ap.add_argument("candidates", nargs="*")
    ap.add_argument("--n", type=int, default=872)
    ap.add_argument("--split", choices=("test", "pool"), default="test",
                    help="test: the SST-2 test sentences; pool: the first n train-pool sentences (a second sample)")
    ap.add_argument("--work", type=Path, default=WORK / "decoder_mix")
    ap.add_argument("--out", type=Path, default=RESULTS / "decoder_mix.jsonl")
    ap.add_argument("--time", type=int, default=0, help="timing rounds: fp32 and every candidate, interleaved")
    a = ap.parse_args(argv)
    os.environ.setdefault("ZOEDGE_THREADS", "1")
    from zoedge import datasets
    from zoedge.runtime.bundle import Bundle

    b = Bundle.open(a.bundle)
    labels = b.manifest.labels
    task = datasets.load_task("sst2", SST2)
    test = (task.test if a.split == "test" else task.pool)[:a.n]
    texts, gold = [t for t, _ in test], np.array([labels.index(y) for _, y in test])
    tensors = b.initial_trainables()
    a.work.mkdir(parents=True, exist_ok=True)
    ref_file = a.work / f"{a.bundle.name}-fp32-{a.n}{'' if a.split == 'test' else '-pool'}.npy"
    if not ref_file.is_file():
        np.save(ref_file, logits_of(b, b.path / b.manifest.model_file, tensors, texts))
    ref = np.load(ref_file)
    ref_margin, ref_pred = ref[:, 1] - ref[:, 0], ref.argmax(1)
    files = {"fp32": b.path / b.manifest.model_file}
    for spec in a.candidates:
        name, opts = parse(spec)
        dst = a.work / f"{a.bundle.name}-{name}.onnx"
        t0 = time.perf_counter()
        details = build(b, tensors, opts, dst)
        t1 = time.perf_counter()
        logits = logits_of(b, dst, tensors, texts)
        pred, err = logits.argmax(1), (logits[:, 1] - logits[:, 0]) - ref_margin
        row = {"bundle": a.bundle.name, "name": name, **opts, "split": a.split, "n": len(texts),
               "agreement": round(float(np.mean(pred == ref_pred)), 4), "flips": int(np.sum(pred != ref_pred)),
               "accuracy": round(float(np.mean(pred == gold)), 4), "fp32_accuracy": round(float(np.mean(ref_pred == gold)), 4),
               "margin_err_rms": round(float(np.sqrt(np.mean(err ** 2))), 4),
               "float_matmuls": details["float_matmuls"], "int8_matmuls": details["quantized_matmuls"],
               "build_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1)}
        print(json.dumps(row), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        files[name] = dst
    if a.time:
        ms = forward_ms(b, files, tensors, texts, a.time)
        row = {"bundle": a.bundle.name, "timing_rounds": a.time, "forward_ms": ms,
               "x_fp32": {k: round(ms["fp32"] / v, 2) for k, v in ms.items()}, "load": os.getloadavg()}
        print(json.dumps(row), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
