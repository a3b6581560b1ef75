"""A patch's tensors as an ONNX Runtime adapter file (`.onnx_adapter`, onnxruntime.AdapterFormat).

Parameter names are the bundle's trainable names (= PEFT keys = graph inputs of model.onnx). Note: the
bundle's graph declares them as required inputs, and onnxruntime's Python `run` insists on feeding
required inputs, so `RunOptions.add_active_adapter` cannot stand in for the feeds on current bundles (it
would on a graph whose trainables are overridable initializers). The patch directory itself loads with
`peft.PeftModel.from_pretrained` (adapter_model.safetensors + adapter_config.json under PEFT keys)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from zoedge.errors import ZoedgeError
from zoedge.patchdoc import ADAPTER_FILE, PatchDoc
from zoedge.runtime.tensors import load_tensors

ORT_ADAPTER_SUFFIX = ".onnx_adapter"


def export_ort_adapter(patch_dir: str | Path, out_file: str | Path, model_version: int = 1) -> Path:
    """Write the patch's adapter tensors to out_file; the adapter version is the patch's global version
    (0 for device patches)."""
    patch_dir, out_file = Path(patch_dir), Path(out_file)
    doc = PatchDoc.load(patch_dir)
    if not (patch_dir / ADAPTER_FILE).is_file():
        raise ZoedgeError(f"{patch_dir}: no {ADAPTER_FILE} (replay a trajectory patch first)")
    tensors = load_tensors(patch_dir / ADAPTER_FILE)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(doc.version)
    fmt.set_model_version(model_version)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                        for name, a in tensors.items()})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(out_file))
    return out_file


def read_ort_adapter(path: str | Path) -> dict[str, np.ndarray]:
    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {name: value.numpy() for name, value in fmt.get_parameters().items()}
