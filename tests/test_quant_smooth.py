"""`--quant int8-smooth` (issue 18): SmoothQuant scale migration on llama MLPs, then per-token int8 GEMMs.

The migration must leave the fp32 function unchanged (it only moves a per-channel factor from an activation into
the weights that read it), must not touch any tensor on the trainable (LoRA / head) path, and the quantized bundle
must verify against torch and answer each input the same whatever its batch mates."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import export_tiny
from zoedge.export.quantize import token_targets, trainable_path_nodes
from zoedge.export.smooth import find_groups, smooth
from zoedge.export.verify import random_trainables, verify_bundle
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.data import read_examples
from zoedge.runtime.forward import open_forward


@pytest.fixture(scope="module")
def tiny_fp32_and_smooth(tmp_path_factory, tiny_llama_bundle):
    # no layer kept in float (the default keeps SmolLM2's first 5, i.e. all of tiny-llama's): the int8 path is tested
    return tiny_llama_bundle, export_tiny(tmp_path_factory.mktemp("s") / "smooth", "tiny-llama", "--quant", "int8-smooth",
                                          "--quant-exclude", "")


def _feeds(bundle: Bundle, texts: list[str], tensors: dict) -> list[dict]:
    return [{"input_ids": ids, "attention_mask": mask, **tensors}
            for ids, mask in (bundle.encoder(texts[i:i + 8]) for i in range(0, len(texts), 8))]


def _run(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate([sess.run(["logits"], {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def test_smoothing_keeps_the_fp32_function_and_the_trainable_path(tiny_fp32_and_smooth, sst2):
    fp32, _ = tiny_fp32_and_smooth
    b = Bundle.open(fp32)
    texts = read_examples(sst2 / "test.tsv").texts[:32]
    tensors = random_trainables(b.manifest, 0, b.initial_trainables())  # LoRA B != 0: the LoRA path counts
    model = onnx.load(str(fp32 / "model.onnx"))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    excluded = trainable_path_nodes(model, list(tensors))
    quantized = [n.name for n in token_targets(model, excluded)]
    groups = find_groups(model, quantized)
    # 2 layers x (post-attention norm -> gate/up, silu(gate)*up -> down); q/k/v feed LoRA, so their norm is left
    assert len(groups) == 4 and sorted(g.source_axis for g in groups) == [0, 0, 1, 1]
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    ref = _run(model, _feeds(b, texts, tensors))
    details = smooth(model, quantized, _feeds(b, texts, tensors))
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert details["smoothed_groups"] == 4 and changed  # not a no-op
    trainable_path = {i for n in model.graph.node if n.name in set(excluded) for i in n.input}
    assert not changed & trainable_path  # nothing a LoRA / head node reads was rescaled
    got = _run(model, _feeds(b, texts, tensors))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int8_smooth_bundle_verifies_and_is_batch_independent(tiny_fp32_and_smooth, sst2):
    _, smoothed = tiny_fp32_and_smooth
    m = Manifest.load(smoothed)
    d = m.quantization_details
    assert m.quantization == "int8-smooth" and d["batch_independent"] is True
    assert d["smoothed_groups"] == 8 and d["explicit_groups"] == 4  # MLP (folded) + attention inputs (inserted Mul)
    assert d["quantized_ops"]["MatMulIntegerToFloat"] == d["quantized_matmuls"] > 0
    r = verify_bundle(smoothed)
    assert r["prediction_agreement"] >= 0.9, r  # tiny random weights: int8 error is large relative to margins
    b = Bundle.open(smoothed)
    fwd = open_forward(b, random_trainables(b.manifest, 0, b.initial_trainables()))
    texts = read_examples(sst2 / "test.tsv").texts[:24]
    one = np.concatenate([fwd(*b.encoder(texts[i:i + 1]), ("logits",))[0] for i in range(len(texts))])
    all_ = fwd(*b.encoder(texts), ("logits",))[0]
    assert np.abs(one - all_).max() <= 1e-5


def test_explicit_smoothing_keeps_the_fp32_function_and_the_trainable_path(tiny_fp32_and_smooth, sst2):
    """Explicit groups (an inserted Mul on the quantized readers' side only: the attention input, which LoRA A also
    reads, and o_proj's input) keep the fp32 function, and LoRA A still reads the unsmoothed activation."""
    fp32, _ = tiny_fp32_and_smooth
    b = Bundle.open(fp32)
    texts = read_examples(sst2 / "test.tsv").texts[:32]
    tensors = random_trainables(b.manifest, 0, b.initial_trainables())

    model = onnx.load(str(fp32 / "model.onnx"))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    excluded = trainable_path_nodes(model, list(tensors))
    quantized = [n.name for n in token_targets(model, excluded)]
    ref = _run(model, _feeds(b, texts, tensors))
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    details = smooth(model, quantized, _feeds(b, texts, tensors), explicit=True)
    # 2 layers x (q/k/v input, o_proj input) explicit + the 4 folded MLP groups
    assert details["explicit_groups"] == 4 and details["smoothed_groups"] == 8
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.output[0].endswith(".smooth")]
    assert len(muls) == 4 and all(not np.allclose(inits[n.input[1]], 1) for n in muls)  # not a no-op
    trainable_path = {i for n in model.graph.node if n.name in set(excluded) for i in n.input}
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not {k for k in before if not np.array_equal(before[k], after[k])} & trainable_path
    lora_inputs = {n.input[0] for n in model.graph.node if n.name in set(excluded) and n.op_type == "MatMul"}
    assert not any(x.endswith(".smooth") for x in lora_inputs)  # LoRA A still reads the unsmoothed activation
    np.testing.assert_allclose(_run(model, _feeds(b, texts, tensors)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_llama_int8_smooth_keeps_the_first_five_layers_in_float():
    """The measured default (docs/quantization.md, issue 18): layers 0-4 of a llama stay fp32 MatMuls under
    int8-smooth, and no other layer does."""
    import re

    from zoedge.export.bundle import DEFAULT_QUANT_EXCLUDE

    rx = re.compile(DEFAULT_QUANT_EXCLUDE[("llama", "int8-smooth")])
    paths = [f"model.layers.{i}.{m}" for i in range(30) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert sorted({int(p.split(".")[2]) for p in paths if rx.search(p)}) == [0, 1, 2, 3, 4]
