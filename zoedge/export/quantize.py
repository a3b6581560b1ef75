"""Quantize the frozen base of an exported graph; the trainable path stays fp32.

Each mode is a file-to-file step (src model.onnx -> dst) built on onnxruntime.quantization. Nodes that
read a trainable graph input (directly or through weight-only ops such as Transpose) are excluded,
so LoRA / head / bias arithmetic is never quantized and its calibration never sees a zero LoRA B.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from zoedge.errors import ZoedgeError

QUANTIZED_OPS = ["MatMul", "Gemm"]
BLOCK_SIZE = 32  # MatMulNBits block along the input dimension; equals GGUF's Q4 block, so Q4_1 weights map 1:1

# `--quant int8` is the 8-bit scheme that keeps accuracy for the architecture (docs/quantization.md): encoders
# use dynamic per-channel int8 (integer GEMMs; MiniLM keeps 97.5% of predictions); llama decoders use
# weight-only int8, since quantizing their activations per tensor costs SmolLM2 11 points of SST-2.
INT8_SCHEME = {"llama": "int8-weight"}


def resolve_mode(mode: str, architecture: str) -> str:
    """The concrete quantization scheme for a requested mode (only 'int8' depends on the architecture)."""
    return INT8_SCHEME.get(architecture, "int8-dynamic") if mode == "int8" else mode


def trainable_path_nodes(model: onnx.ModelProto, trainable_names: Iterable[str]) -> list[str]:
    """Names of nodes that consume a tensor derived only from trainable inputs and constants."""
    graph = model.graph
    consts = {i.name for i in graph.initializer}
    derived = set(trainable_names)
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type == "Constant":
            consts.update(node.output)
            continue
        ins = [i for i in node.input if i]
        if ins and any(i in derived for i in ins) and all(i in derived or i in consts for i in ins):
            derived.update(node.output)
    return [n.name for n in graph.node if any(i in derived for i in n.input)]


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node came from, from the dynamo exporter's `namespace` metadata ('' if absent)."""
    for p in node.metadata_props:
        if p.key == "namespace":
            found = re.findall(r"module\.([\w.]+):", p.value)
            return found[-1] if found else ""
    return ""


def nodes_matching(model: onnx.ModelProto, pattern: str) -> list[str]:
    """Names of nodes whose source module path matches the regex `pattern` (e.g. 'down_proj|layers\\.0\\.')."""
    rx = re.compile(pattern)
    return [n.name for n in model.graph.node if rx.search(module_path(n))]


def _name_nodes(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(path))
    return model


def quantize(src: Path, dst: Path, mode: str, trainable_names: list[str],
             calibration_feeds: list[dict[str, np.ndarray]] | None = None, exclude: str | None = None) -> dict[str, Any]:
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    model = _name_nodes(src)
    excluded = trainable_path_nodes(model, trainable_names)
    details: dict[str, Any] = {"excluded_trainable_path_nodes": len(excluded)}
    if exclude:
        chosen = [n for n in nodes_matching(model, exclude) if n not in excluded]
        if not chosen:
            raise ZoedgeError(f"bad --quant-exclude {exclude!r}: matches no node's module path")
        excluded += chosen
        details.update(exclude_pattern=exclude, excluded_by_pattern=len(chosen))
    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=excluded)
        onnx.save(fp16, str(dst))
        details.update(method="onnxruntime.transformers.float16", keep_io_types=True)
    elif mode == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded)
        details.update(method="quantize_dynamic", weight_type="QInt8", per_channel=True, op_types=QUANTIZED_OPS)
    elif mode == "int8-static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        if not calibration_feeds:
            raise ZoedgeError("int8-static needs calibration data")

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calibration_feeds)

            def get_next(self):
                return next(self.it, None)

        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded,
                        extra_options={"ActivationSymmetric": True})
        details.update(method="quantize_static", format="QDQ", per_channel=True, activation_type="QInt8",
                       weight_type="QInt8", calibration_batches=len(calibration_feeds), op_types=QUANTIZED_OPS)
    elif mode in ("int8-weight", "int4"):
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        if mode == "int4":  # HQQ: float zero points, so a GGUF Q4_1 base (SmolLM2) is re-encoded losslessly
            config = mnb.HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4)
            details.update(method="MatMulNBits", algorithm="HQQ", bits=4, block_size=BLOCK_SIZE)
        else:
            config = mnb.DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=8)
            details.update(method="MatMulNBits", algorithm="RTN", bits=8, block_size=BLOCK_SIZE, symmetric=True)
        q = mnb.MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, algo_config=config)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise ZoedgeError(f"unknown quantization {mode!r}")
    qmodel = onnx.load(str(dst), load_external_data=False)
    ops = [n.op_type for n in qmodel.graph.node]
    details["quantized_ops"] = {op: ops.count(op) for op in sorted(set(ops)) if op in
                                ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                                 "MatMulNBits", "Cast")}
    return details
