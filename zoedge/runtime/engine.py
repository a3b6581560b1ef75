"""ONNX Runtime session for a bundle, created once, with the manifest's execution-provider plan.

Providers the installed onnxruntime lacks are dropped with a visible warning, falling back to CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnxruntime as ort

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest


def provider_plan(manifest: Manifest, bundle_dir: Path, warn=None) -> tuple[list[str], list[dict]]:
    available = set(ort.get_available_providers())
    names, options = [], []
    for p in manifest.providers or [{"name": "CPUExecutionProvider"}]:
        name, opts = p["name"], dict(p.get("options") or {})
        if name not in available:
            (warn or _stderr)(f"zoedge: execution provider {name} is not available here; skipping it")
            continue
        if "trt_engine_cache_path" in opts:
            opts["trt_engine_cache_path"] = str(bundle_dir / opts["trt_engine_cache_path"])
        names.append(name)
        options.append({k: str(v) if isinstance(v, bool) else v for k, v in opts.items()})
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
        options.append({})
    return names, options


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def create_session(bundle_dir: str | Path, manifest: Manifest, threads: int = 0, warn=None) -> ort.InferenceSession:
    bundle_dir = Path(bundle_dir)
    if manifest.model_format == "tflite":
        raise ZoedgeError(f"{bundle_dir}: a TFLite bundle runs on the LiteRT backend, not onnxruntime")
    path = bundle_dir / manifest.model_file
    if not path.is_file():
        raise ZoedgeError(f"{bundle_dir}: missing {manifest.model_file}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Memory-pattern planning caches an allocation plan per input shape; ZO training sees a new sequence
    # length almost every step, and the cached plans raised peak RSS ~10% (220 -> 197 MB, MiniLM int8,
    # 200 batches) for ~6% slower forwards. Memory is the device's constraint: off unless asked for.
    so.enable_mem_pattern = os.environ.get("ZOEDGE_MEM_PATTERN", "0") == "1"
    threads = threads or int(os.environ.get("ZOEDGE_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    names, options = provider_plan(manifest, bundle_dir, warn)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=names, provider_options=options)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ZoedgeError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]})") from None
    graph_inputs = {i.name for i in session.get_inputs()}
    missing = [t.name for t in manifest.trainables if t.name not in graph_inputs]
    if missing:
        raise ZoedgeError(f"{bundle_dir}: manifest trainable {missing[0]!r} is not an input of {manifest.model_file}")
    for i in session.get_inputs():
        t = next((t for t in manifest.trainables if t.name == i.name), None)
        if t is not None and list(i.shape) != manifest.graph_shape(t):
            raise ZoedgeError(f"{bundle_dir}: trainable {t.name!r} has shape {manifest.graph_shape(t)} in the "
                              f"manifest but {list(i.shape)} in {manifest.model_file}")
    return session

