"""`zoedge patch merge`: a bundle + a patch -> a plain inference bundle with the trained values baked in.

The bundle's trainable graph inputs become ONNX initializers holding the patch's tensors; the new bundle's
manifest lists no trainables (so it needs no trainable.safetensors and no patch), keeps the labels and the
tokenizer, carries a decoder patch's chosen prompt as its prompt template, and records what was merged in
`merged_from`. It runs with `zoedge predict` / `zoedge eval` alone.

Needs the `onnx` package (in the `export` extra; a device with only the core install lacks it: `pip install
onnx`). ONNX bundles only: an ORT-format or TFLite bundle cannot be edited, a `--copies` bundle's trainables
carry a copies axis (re-export without it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

from zoedge.errors import ZoedgeError
from zoedge.fsio import mkdtemp_in
from zoedge.manifest import TOKENIZER_FILE, Manifest, sha256_file, trainables_sha256
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.patch import load_patch
from zoedge.runtime.tensors import tensor_digest

ONNX_MISSING = ("`zoedge patch merge` needs the onnx package, which the device core does not install: "
                "pip install onnx (or the export extra, pip install 'zoedge[export]')")


def merge_patch(bundle_dir: str | Path, patch_dir: str | Path, out: str | Path) -> Manifest:
    """Write the merged bundle to `out` (absent or empty); it appears complete or not at all."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ZoedgeError(ONNX_MISSING) from None
    bundle_dir, out = Path(bundle_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZoedgeError(f"--out {out}: exists and is not an empty directory")
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    if not m.trainables:
        raise ZoedgeError(f"{bundle_dir}: has no trainable inputs (already a merged bundle?)")
    if m.model_format != "onnx":
        raise ZoedgeError(f"{bundle_dir}: a {m.model_format} bundle cannot be merged; export it as onnx")
    if m.copies:
        raise ZoedgeError(f"{bundle_dir}: its trainables have a copies axis (export --copies); re-export without it")
    doc, tensors = load_patch(patch_dir, m)  # refused unless trained on this bundle
    model = onnx.load(str(bundle_dir / m.model_file))
    graph = model.graph
    kept = [i for i in graph.input if i.name not in tensors]
    if len(graph.input) - len(kept) != len(tensors):
        raise ZoedgeError(f"{bundle_dir / m.model_file}: not every trainable is a graph input")
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in tensors.items())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_in(out.parent, out.name)
    try:
        onnx.save(model, str(tmp / m.model_file))
        shutil.copyfile(bundle_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        merged = dataclasses.replace(
            m, trainables=[], trainable_kinds=[], lora=None, copies=0, files={}, bundle_id=uuid.uuid4().hex,
            initial_sha256=tensor_digest({}),
            lineage=dataclasses.replace(m.lineage, trainables_sha256=trainables_sha256([])),  # trains nothing
            prompt_template=doc.prompt_template or m.prompt_template, prompt_candidates=[],
            merged_from={"bundle_id": m.bundle_id, "patch_adapter_sha256": doc.adapter_sha256,
                         "patch_kind": doc.kind, "patch_version": doc.version})
        merged.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        merged.save(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return merged

