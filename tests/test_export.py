"""Export: torch vs onnxruntime parity for every trainable kind, PEFT key mapping, bundle contents."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import export_tiny
from zoedge.export.verify import verify_bundle
from zoedge.manifest import MODEL_FILE, TOKENIZER_FILE, TRAINABLE_FILE, Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.engine import create_session

CASES = [
    ("tiny-bert", "classify", "lora,head"),
    ("tiny-bert", "classify", "bias"),
    ("tiny-bert", "classify", "full"),
    ("tiny-llama", "classify", "lora,head"),
    ("tiny-llama", "classify", "bias,head"),
    ("tiny-llama", "lm", "lora"),
    ("tiny-llama", "lm", "full"),
    ("tiny-bert", "classify", "lora,head", 4),
    ("tiny-llama", "classify", "lora,head", 2),
]
# The default run keeps one case per model and kind; the rest (5-10 s each) run in make test-slow, to keep
# make test under 5 minutes.
SLOW_CASES = {("tiny-llama", "classify", "bias,head", 0), ("tiny-llama", "lm", "full", 0),
              ("tiny-llama", "classify", "lora,head", 2)}


@pytest.mark.parametrize("model, task, trainable, copies", [
    pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in (
        c if len(c) == 4 else (*c, 0) for c in CASES)])
def test_parity_torch_vs_onnxruntime(tmp_path, model, task, trainable, copies):
    """With a copies axis, each copy gets different values and is checked against torch separately."""
    out = export_tiny(tmp_path / "b", model, "--task", task, "--trainable", trainable, "--copies", copies)
    r = verify_bundle(out)
    assert r["n"] >= 8
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["prediction_agreement"] == 1.0, r
    m = Manifest.load(out)
    roles = {t.role for t in m.trainables}
    if "lora" in trainable:
        assert {"lora_A", "lora_B"} <= roles
    if "head" in trainable:
        assert "head" in roles
    if trainable == "full":
        assert "weight" in roles and m.num_trainable > 0.9 * m.num_parameters


def test_bundle_files_and_initial_state(tiny_bert_bundle):
    m = Manifest.load(tiny_bert_bundle)
    assert set(m.files) == {MODEL_FILE, TRAINABLE_FILE, TOKENIZER_FILE}
    b = Bundle.open(tiny_bert_bundle)
    init = b.initial_trainables()
    # LoRA B starts at zero (the exported model equals the base); A is random.
    for t in m.trainables:
        if t.role == "lora_B":
            assert not init[t.name].any()
        if t.role == "lora_A":
            assert np.abs(init[t.name]).sum() > 0
    # Changing a trainable input changes the output: trainables really are live graph inputs.
    s = create_session(tiny_bert_bundle, m)
    ids, mask = b.encoder(["a fine film", "a dreadful film"])
    base = s.run(None, {"input_ids": ids, "attention_mask": mask, **init})[0]
    for role in ("lora_B", "head"):
        moved_tensors = {k: v.copy() for k, v in init.items()}
        for t in m.trainables:
            if t.role == role:
                moved_tensors[t.name] += np.random.default_rng(1).standard_normal(t.shape).astype(np.float32)
        moved = s.run(None, {"input_ids": ids, "attention_mask": mask, **moved_tensors})[0]
        assert np.abs(moved - base).max() > 1e-3, role


def test_trainable_names_are_peft_keys(tiny_bert_bundle):
    """The names peft's save_pretrained would write are exactly the bundle's trainable names."""
    from peft import get_peft_model_state_dict

    from zoedge.export.assemble import build_selection
    from zoedge.models.registry import load_source

    m = Manifest.load(tiny_bert_bundle)
    sel = build_selection(load_source("tiny-bert"), "classify", 2, [], ["lora", "head"])
    peft_keys = {"base_model.model." + k if not k.startswith("base_model.model.") else k
                 for k in get_peft_model_state_dict(sel.module)}
    assert {t.name for t in m.trainables} == peft_keys
    assert all(t.peft_key == t.name for t in m.trainables)
    lora_a = [t for t in m.trainables if t.role == "lora_A"]
    assert lora_a and all(t.shape[0] == m.lora.rank for t in lora_a)  # PEFT layout: A is (r, in)


def test_decoder_bundle_outputs_only_label_logits(tiny_llama_bundle):
    m = Manifest.load(tiny_llama_bundle)
    assert [o.name for o in m.outputs] == ["logits", "features"]
    assert m.outputs[0].shape == ["batch", 2] and m.outputs[1].shape == ["batch", 64]
    assert len(m.label_token_ids) == 2 and "{sentence}" in m.prompt_template
    b = Bundle.open(tiny_llama_bundle)
    s = create_session(tiny_llama_bundle, m)
    ids, mask = b.encoder(["short", "a much longer sentence that needs padding at the end"])
    out = s.run(None, {"input_ids": ids, "attention_mask": mask, **b.initial_trainables()})[0]
    assert out.shape == (2, 2)
    # Right padding: the padded row gives the same logits as when run alone.
    alone = s.run(None, {"input_ids": ids[:1, :mask[0].sum()], "attention_mask": mask[:1, :mask[0].sum()],
                         **b.initial_trainables()})[0]
    np.testing.assert_allclose(out[:1], alone, atol=1e-5)


def test_fp16_and_int8_bundles_run(tmp_path):
    for quant in ("fp16", "int8"):
        out = export_tiny(tmp_path / quant, "tiny-bert", "--quant", quant)
        m = Manifest.load(out)
        assert m.quantization == quant and m.quantization_details["excluded_trainable_path_nodes"] > 0
        r = verify_bundle(out)
        assert r["max_abs_diff"] < 0.05, r


def test_jetson_target_plan_and_visible_cpu_fallback(tmp_path):
    """--target jetson: fp16 base, TensorRT > CUDA > CPU plan with an engine cache and a fixed shape profile;
    where those providers are absent (this machine) the runtime says so and runs on the CPU."""
    out = export_tiny(tmp_path / "j", "tiny-bert", "--target", "jetson")
    m = Manifest.load(out)
    assert m.quantization == "fp16"
    names = [p["name"] for p in m.providers]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = m.providers[0]["options"]
    assert trt["trt_fp16_enable"] and trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == "trt_cache"
    assert trt["trt_profile_max_shapes"] == "input_ids:64x64,attention_mask:64x64"
    warnings = []
    session = create_session(out, m, warn=warnings.append)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert any("TensorrtExecutionProvider is not available" in w for w in warnings)
    assert any("CUDAExecutionProvider is not available" in w for w in warnings)
    b = Bundle.open(out)
    ids, mask = b.encoder(["runs on the cpu"])
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **b.initial_trainables()})[0]
    assert logits.shape == (1, 2) and np.isfinite(logits).all()


def test_ort_format_bundle(tmp_path):
    out = export_tiny(tmp_path / "o", "tiny-bert", "--format", "ort")
    m = Manifest.load(out)
    assert m.model_format == "ort" and m.model_file == "model.ort" and "model.onnx" not in m.files
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # the ORT flatbuffer file identifier
    r = verify_bundle(out)
    assert r["max_abs_diff"] <= 1e-4 and r["prediction_agreement"] == 1.0


@pytest.mark.slow  # tens of seconds of quantization passes: `make test-slow` (default run < 5 min)
def test_quant_exclude_keeps_matching_modules_in_float(tmp_path):
    plain = Manifest.load(export_tiny(tmp_path / "a", "tiny-bert", "--quant", "int8"))
    kept = Manifest.load(export_tiny(tmp_path / "b", "tiny-bert", "--quant", "int8", "--quant-exclude", r"output\.dense"))
    assert kept.quantization_details["excluded_by_pattern"] == 8  # 2 layers x 2 dense Linears x (MatMul, bias Add)
    n_plain = plain.quantization_details["quantized_ops"]["MatMulIntegerToFloat"]
    assert kept.quantization_details["quantized_ops"]["MatMulIntegerToFloat"] == n_plain - 4


@pytest.mark.slow  # tens of seconds of quantization passes: `make test-slow` (default run < 5 min)
def test_llama_int8_is_weight_only_and_int8_dynamic_keeps_down_proj_in_float(tmp_path):
    """`--quant int8` on llama = weight-only MatMulNBits (activations stay float: dynamic per-tensor activation
    scales cost SmolLM2 11 points); `--quant int8-dynamic` is still there, with down_proj kept in float."""
    out = export_tiny(tmp_path / "w", "tiny-llama", "--quant", "int8")
    m = Manifest.load(out)
    d = m.quantization_details
    assert m.quantization == "int8" and d["scheme"] == "int8-weight" and d["bits"] == 8
    assert d["quantized_ops"].get("MatMulNBits", 0) >= 7 * 2 and "MatMulInteger" not in d["quantized_ops"]
    r = verify_bundle(out)
    assert r["max_abs_diff"] < 0.05 and r["prediction_agreement"] == 1.0, r
    m = Manifest.load(export_tiny(tmp_path / "d", "tiny-llama", "--quant", "int8-dynamic"))
    assert m.quantization_details["scheme"] == "int8-dynamic"
    assert m.quantization_details["exclude_pattern"] == "down_proj"
    assert m.quantization_details["excluded_by_pattern"] >= 2  # one down_proj MatMul per layer
    assert Manifest.load(export_tiny(tmp_path / "b", "tiny-bert", "--quant", "int8")).quantization_details[
        "scheme"] == "int8-token"
    assert Manifest.load(export_tiny(tmp_path / "t", "tiny-bert", "--quant", "int8-token")).quantization == "int8-token"


@pytest.mark.slow  # tens of seconds of quantization passes: `make test-slow` (default run < 5 min)
def test_llama_int4_is_hqq_with_float_zero_points(tmp_path):
    out = export_tiny(tmp_path / "q4", "tiny-llama", "--quant", "int4")
    m = Manifest.load(out)
    assert m.quantization_details["algorithm"] == "HQQ" and m.quantization_details["block_size"] == 32
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_points")]
    assert zero_points and all(z.data_type == onnx.TensorProto.FLOAT for z in zero_points)
    r = verify_bundle(out)
    assert r["max_abs_diff"] < 0.5, r  # random 64-wide weights are not on a 4-bit grid; SmolLM2's are (slow test)