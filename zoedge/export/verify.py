"""`zoedge verify`: the bundle in onnxruntime vs the source model in torch, same random non-zero trainables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.export.bundle import BUILTIN_CALIBRATION
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.data import read_examples
from zoedge.runtime.engine import create_session


def random_trainables(manifest: Manifest, seed: int = 0, initial: dict[str, np.ndarray] | None = None
                      ) -> dict[str, np.ndarray]:
    """The initial values (zeros if not given) plus non-zero noise: LoRA B = 0 cannot hide a wrong graph,
    and heads keep their meaning (a decoder's label head starts as the label words' LM rows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in manifest.trainables:
        a = initial[t.name] if initial is not None else np.zeros(t.shape, np.float32)
        scale = 0.02 if t.role == "lora_B" or not a.any() else 0.05 * float(np.std(a)) + 1e-3
        out[t.name] = (a + rng.standard_normal(a.shape) * scale).astype(np.float32)
    return out


def sample_texts(data, n: int) -> list[str]:
    """n texts: the first n of `data`, else the built-in sentences and, past their count, pairs of them joined
    (distinct inputs of other lengths), so `--n 32` compares 32 inputs. A file shorter than n gives what it has."""
    if n < 1:
        raise ZoedgeError(f"bad --n {n}: compare at least one input")
    if data:
        return read_examples(data, need_labels=False).texts[:n]
    base = list(BUILTIN_CALIBRATION)
    texts = base[:n]
    k = 1
    while len(texts) < n and k < len(base):
        texts += [f"{base[i]} {base[(i + k) % len(base)]}" for i in range(len(base))][:n - len(texts)]
        k += 1
    return texts


# What a bundle must meet to pass (prediction agreement with torch, largest |onnx - torch| output difference):
# fp32 graphs compute the same function (measured <= 1e-4 on the test models); fp16 and quantized ones may move
# outputs and flip a few close calls (SmolLM2 int8-dynamic agrees on 85% of 200 SST-2 sentences, int8 / int4 on
# 95%+: docs/quantization.md).
THRESHOLDS = {"fp32": (1.0, 1e-3), "fp16": (0.95, None)}
QUANT_THRESHOLD = (0.85, None)


def verdict(r: dict, min_agreement: float | None = None, max_diff: float | None = None) -> tuple[bool, str]:
    """(passed, why) for a verify_bundle result; thresholds by quantization unless given."""
    agree, diff = THRESHOLDS.get(r["quantization"], QUANT_THRESHOLD)
    agree = agree if min_agreement is None else min_agreement
    diff = diff if max_diff is None else max_diff
    problems = []
    if r["prediction_agreement"] < agree:
        problems.append(f"prediction agreement {r['prediction_agreement'] * 100:.1f}% is below {agree * 100:.1f}%")
    if diff is not None and not r["max_abs_diff"] <= diff:
        problems.append(f"max |onnx - torch| {r['max_abs_diff']:.3g} is above {diff:.3g}")
    if problems:
        return False, "; ".join(problems)
    bound = f", max diff <= {diff:.3g}" if diff is not None else ""
    return True, f"agreement >= {agree * 100:.1f}%{bound} ({r['quantization']})"


def reference_inputs(bundle: Bundle, data, n: int, seed: int):
    """The torch source model as a trainables-as-inputs wrapper, perturbed trainables, and tokenised sample
    texts: what every engine's bundle is compared against."""
    from zoedge.export.assemble import build_selection
    from zoedge.export.onnx_graph import TrainablesAsInputs
    from zoedge.models.registry import load_source

    m = bundle.manifest
    lora = m.lora
    sel = build_selection(load_source(m.model_id), m.task, len(m.labels), m.label_token_ids, m.trainable_kinds,
                          lora.rank if lora else 8, lora.alpha if lora else 16.0, lora.targets if lora else None)
    wrapper = TrainablesAsInputs(sel.module, sel.param_names).eval()
    trainables = random_trainables(m, seed, bundle.initial_trainables())
    texts = sample_texts(data, n)
    ids, mask = bundle.encoder(texts)
    return wrapper, trainables, texts, ids, mask


def verify_bundle(bundle_dir: str | Path, data: str | Path | None = None, n: int = 32, seed: int = 0) -> dict:
    import torch

    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    if m.model_format == "tflite":
        from zoedge.export.tflite import verify_tflite

        return verify_tflite(bundle_dir, data, n, seed)
    wrapper, trainables, texts, ids, mask = reference_inputs(bundle, data, n, seed)

    session = create_session(bundle.path, m)
    # A copies bundle gets a different θ per copy; copy c's rows must match torch run with θ_c.
    per_copy = [trainables] + [{k: v + np.float32(0.02 * c) * np.sign(v) for k, v in trainables.items()}
                               for c in range(1, max(m.copies, 1))]
    if m.copies:
        feed = {k: np.stack([t[k] for t in per_copy]) for k in trainables}
        got = session.run(None, {"input_ids": np.tile(ids, (m.copies, 1)), "attention_mask": np.tile(mask, (m.copies, 1)), **feed})
        got_per_copy = [[o.reshape(m.copies, len(ids), *o.shape[1:])[c] for o in got] for c in range(m.copies)]
    else:
        got_per_copy = [session.run(None, {"input_ids": ids, "attention_mask": mask, **trainables})]
    diff, agree_n = 0.0, []
    for theta, got in zip(per_copy, got_per_copy):
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), {k: torch.from_numpy(v) for k, v in theta.items()})
        ref = [ref.numpy()] if isinstance(ref, torch.Tensor) else [r.numpy() for r in ref]
        diff = max(diff, float(max(np.abs(g - r).max() for g, r in zip(got, ref))))
        agree_n.append(prediction_agreement(m.task, got, ref))
    return {"max_abs_diff": diff, "prediction_agreement": float(np.mean(agree_n)), "n": len(texts),
            "quantization": m.quantization}


def prediction_agreement(task: str, got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    if task == "classify":
        return float(np.mean(got[0].argmax(-1) == ref[0].argmax(-1)))
    g, r = got[0] / np.maximum(got[1], 1), ref[0] / np.maximum(ref[1], 1)  # per-row mean NLL within 1%
    return float(np.mean(np.abs(g - r) <= 0.01 * np.abs(r) + 1e-6))
