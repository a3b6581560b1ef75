"""Runs inside .venv-ort-training (onnxruntime-training-cpu 1.19.2): a standalone script, not a zoedge import.

  generate --requires-grad JSON   artifacts from WORK/train.onnx (CrossEntropyLoss on logits, AdamW)
  train --lr LR --warmup W        one AdamW step per batch of WORK/data.npz; prints a JSON line
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def status_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: round(int(ln.split()[1]) / 1024.0, 1) for ln in f
                if ln.split(":")[0] in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def peak_mb() -> float:
    """VmHWM: this process image's own peak (ru_maxrss would include the RSS of the process that started us). This
    script runs in the onnxruntime-training venv, which has no zoedge: zoedge.runtime.memory cannot be imported."""
    return status_mb().get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(work: Path, requires_grad: list[str]) -> dict:
    import onnx
    from onnxruntime.training import artifacts

    t = time.perf_counter()
    model = onnx.load(str(work / "train.onnx"))
    names = {i.name for i in model.graph.initializer}
    missing = [n for n in requires_grad if n not in names]
    if missing:
        raise SystemExit(f"requires_grad names not among the graph's initializers: {missing[:3]}")
    frozen = sorted(names - set(requires_grad))
    artifacts.generate_artifacts(model, requires_grad=requires_grad, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.AdamW,
                                 artifact_directory=str(work / "artifacts"))
    return {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(peak_mb(), 1),
            "trainable_tensors": len(requires_grad)}


def train(work: Path, lr: float, warmup: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.training import api

    a = work / "artifacts"
    state = api.CheckpointState.load_checkpoint(str(a / "checkpoint"))
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    module = api.Module(str(a / "training_model.onnx"), state, str(a / "eval_model.onnx"), "cpu", so)
    opt = api.Optimizer(str(a / "optimizer_model.onnx"), module)
    opt.set_learning_rate(lr)
    module.train()
    data = np.load(work / "data.npz")
    times, losses = [], []
    for i in range(int(data["n"])):
        ids, mask, y = data[f"ids_{i}"], data[f"mask_{i}"], data[f"y_{i}"]
        t = time.perf_counter()
        loss = module(ids.astype(np.int64), mask.astype(np.int64), y.astype(np.int64))
        opt.step()
        module.lazy_reset_grad()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    timed = times[warmup:] if len(times) > warmup else times
    return {"step_ms": round(float(np.median(timed)) * 1000, 2), "forward_passes_per_step": 1,
            "backward_passes_per_step": 1, "steps": len(times), "losses": [round(x, 4) for x in losses],
            "peak_rss_mb": round(peak_mb(), 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1), "torch_imported": "torch" in sys.modules,
            "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "status_end_mb": status_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("mode", choices=["generate", "train"])
    ap.add_argument("--requires-grad", default="[]")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    out = generate(a.work, json.loads(a.requires_grad)) if a.mode == "generate" else train(a.work, a.lr, a.warmup, a.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
