"""Patch interop: an ONNX Runtime .onnx_adapter file, and peft.PeftModel.from_pretrained on the patch dir."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from patch_factory import make_patch
from zoedge.device.peft_export import export_ort_adapter, read_ort_adapter
from zoedge.manifest import Manifest
from zoedge.runtime.engine import create_session
from zoedge.runtime.patch import ADAPTER_FILE
from zoedge.runtime.tensors import load_tensors


def token_inputs(vocab: int = 1000, batch: int = 3, width: int = 12):
    rng = np.random.default_rng(0)
    ids = rng.integers(100, vocab, size=(batch, width)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # one padded row
    return ids, mask


def test_ort_adapter_round_trip(tiny_bert_bundle, tmp_path):
    patch = make_patch(tiny_bert_bundle, tmp_path / "p", steps=5, lr=5e-2, run_seed=5, seed=5, start_head=True)
    path = export_ort_adapter(patch, tmp_path / "p.onnx_adapter")
    tensors = load_tensors(patch / ADAPTER_FILE)
    back = read_ort_adapter(path)
    assert sorted(back) == sorted(tensors)
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], tensors[k]) for k in tensors)
    assert ort.AdapterFormat.read_adapter(str(path)).get_model_version() == 1



def test_peft_from_pretrained_matches_onnx_bundle(tiny_bert_bundle, tmp_path):
    import torch
    from peft import PeftModel

    from zoedge.export.heads import EncoderClassifier
    from zoedge.models.registry import load_source

    patch = make_patch(tiny_bert_bundle, tmp_path / "p", steps=8, lr=5e-2, run_seed=9, seed=9, start_head=True)
    tensors = load_tensors(patch / ADAPTER_FILE)
    task = EncoderClassifier(load_source("tiny-bert").model, 2).eval()
    model = PeftModel.from_pretrained(task, str(patch)).eval()
    # every patch tensor landed in the model (and the patch is not the untrained start)
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        candidates = [k for k in params if _peft_param_matches(k, name)]
        assert len(candidates) == 1, (name, candidates)
        np.testing.assert_array_equal(params[candidates[0]].detach().numpy(), value, err_msg=name)
    ids, mask = token_inputs()
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
    session = create_session(tiny_bert_bundle, Manifest.load(tiny_bert_bundle))
    onnx_logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **tensors})[0]
    np.testing.assert_allclose(torch_logits, onnx_logits, atol=1e-4, rtol=0)
    initial = session.run(["logits"], {"input_ids": ids, "attention_mask": mask,
                                       **load_tensors(tiny_bert_bundle / "trainable.safetensors")})[0]
    assert np.abs(initial - onnx_logits).max() > 1e-3  # the comparison sees the patch


def _peft_param_matches(param_name: str, peft_key: str) -> bool:
    """A live parameter name (with adapter name / modules_to_save wrappers) for a saved PEFT key."""
    normal = (param_name.replace(".modules_to_save.default.", ".").replace(".lora_A.default.", ".lora_A.")
              .replace(".lora_B.default.", ".lora_B.").replace(".base_layer.", "."))
    return normal == peft_key and "original_module" not in param_name
