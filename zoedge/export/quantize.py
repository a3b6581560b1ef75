"""Quantize the frozen base of an exported graph; the trainable path stays fp32.

Each mode is a file-to-file step (src model.onnx -> dst), built on onnxruntime.quantization or, for
int8-token, on a graph rewrite here. Nodes that read a trainable graph input (directly or through
weight-only ops such as Transpose) are excluded, so LoRA / head / bias arithmetic is never quantized and
its calibration never sees a zero LoRA B.
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

# `--quant int8` is the 8-bit scheme that keeps accuracy for the architecture (docs/quantization.md). Encoders
# use int8-token: integer GEMMs with one activation scale per token (row), so a prediction never depends on its
# batch mates (int8-dynamic's one scale per batch flipped 31 of 872 SST-2 sentences between eval batch 1 and 64),
# and MiniLM keeps 98.4% of a trained head's fp32 predictions (int8-dynamic 97.5%, static QDQ <= 96%). Llama
# decoders use weight-only int8, since quantizing their activations per tensor costs SmolLM2 11 points of SST-2.
# Gemma 3 decoders follow llama (measured in docs/quantization.md).
INT8_SCHEME = {"llama": "int8-weight", "gemma3_text": "int8-weight"}
# Architectures whose token-embedding table is quantized too by the weight-only modes (int8-weight, int4): Gemma 3's
# 262,144 x 640 table is 63% of its weights (671 MB in fp32, which MatMulNBits never touches). It becomes int8 with
# one fp32 scale per block of 32 along the hidden axis: the GGUF stores it as Q8_0 (that very layout), so this is
# lossless for it. SmolLM2 keeps its float table (measured bundles unchanged).
QUANTIZED_EMBEDDINGS = {"gemma3_text"}
EMBEDDING_MIN_ROWS = 1024  # a Gather over a constant table with at least this many rows is a vocabulary embedding
ENCODER_INT8 = "int8-token"


def resolve_mode(mode: str, architecture: str) -> str:
    """The concrete quantization scheme for a requested mode (only 'int8' depends on the architecture)."""
    return INT8_SCHEME.get(architecture, ENCODER_INT8) if mode == "int8" else mode


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
             calibration_feeds: list[dict[str, np.ndarray]] | None = None, exclude: str | None = None,
             embedding: bool = False) -> dict[str, Any]:
    """`embedding`: also quantize the token-embedding Gather (weight-only modes and int8-smooth; see
    QUANTIZED_EMBEDDINGS)."""
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
    if embedding and mode in ("int8-weight", "int4", "int8-smooth"):
        details["embedding"] = blocked_int8_embeddings(model, excluded)
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
    elif mode == "int8-token":
        details.update(per_token_int8(model, dst, excluded))
    elif mode == "int8-smooth":  # SmoothQuant scale migration, then int8-token (zoedge/export/smooth.py)
        from zoedge.export.smooth import smooth

        if not calibration_feeds:
            raise ZoedgeError("int8-smooth needs calibration data")
        details.update(smooth(model, [n.name for n in token_targets(model, excluded)], calibration_feeds,
                              explicit=True))
        details.update(per_token_int8(model, dst, excluded), calibration_batches=len(calibration_feeds))
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
                                ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QuantizeLinear",
                                 "DequantizeLinear", "MatMulNBits", "Cast")}
    return details


TOKEN_OPSET = 21  # QuantizeLinear with block_size (one scale per row) is opset 21; onnxruntime >= 1.20 runs it


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: Iterable = ()) -> None:
    """The graph's nodes become `nodes` (a rewrite's output); initializers nothing reads any more are dropped,
    the new ones added; the default opset is raised to TOKEN_OPSET (blocked Quantize/DequantizeLinear)."""
    graph = model.graph
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in [*graph.initializer, *new_inits] if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, TOKEN_OPSET)
    model.ir_version = max(model.ir_version, 10)


def blocked_int8_embeddings(model: onnx.ModelProto, excluded: Iterable[str]) -> dict[str, Any]:
    """Rewrite, in place, each Gather over a constant float vocabulary table W [V, H] (axis 0, not excluded) as

        Gather(Wq, ids) -> DequantizeLinear(., Gather(scale, ids), axis=-1, block_size=32)

    Wq = round(W / scale) in int8, symmetric, one fp32 scale = max |w| / 127 per block of 32 along H. Standard
    opset-21 ops only (blocked DequantizeLinear); the float table is dropped unless another node still reads it."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    skip = set(excluded)
    inits = {i.name: i for i in graph.initializer}
    done: dict[str, float] = {}  # table -> largest |dequantized - float| weight
    nodes = []
    for n in graph.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" and n.name not in skip else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if (t is None or axis != 0 or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT
                or t.dims[0] < EMBEDDING_MIN_ROWS or t.dims[1] % BLOCK_SIZE):
            nodes.append(n)
            continue
        q_name, s_name = n.input[0] + ".int8", n.input[0] + ".int8_scale"
        if n.input[0] not in done:
            w = numpy_helper.to_array(t).astype(np.float32)
            blocks = w.reshape(w.shape[0], -1, BLOCK_SIZE)
            amax = np.abs(blocks).max(-1)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int8).reshape(w.shape)
            graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
            done[n.input[0]] = float(np.abs(q.reshape(blocks.shape) * scale[..., None] - blocks).max())
            del w, blocks, q
        out = n.output[0]
        nodes += [helper.make_node("Gather", [q_name, n.input[1]], [out + ".q"], axis=0, name=n.name + ".int8"),
                  helper.make_node("Gather", [s_name, n.input[1]], [out + ".s"], axis=0, name=n.name + ".int8_scale"),
                  helper.make_node("DequantizeLinear", [out + ".q", out + ".s"], [out], axis=-1,
                                   block_size=BLOCK_SIZE, name=n.name)]
    if not done:
        return {"quantized_tables": 0}
    replace_nodes(model, nodes)
    return {"quantized_tables": len(done), "method": "int8 Gather + blocked DequantizeLinear", "bits": 8,
            "block_size": BLOCK_SIZE, "symmetric": True, "scale": "float32",
            "max_abs_error": max(done.values())}
_TINY = 1e-30  # a scale floor: an all-zero row quantizes to zeros instead of dividing by zero


def token_targets(model: onnx.ModelProto, excluded: Iterable[str]) -> list[onnx.NodeProto]:
    """The MatMuls int8-token quantizes: a constant 2-D float weight, not excluded."""
    skip = set(excluded)
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def per_token_int8(model: onnx.ModelProto, dst: Path, excluded: Iterable[str]) -> dict[str, Any]:
    """int8 GEMMs whose activation scale is computed per token (row) from that row alone.

    Every MatMul with a constant 2-D float weight W [K, N] (and not excluded) becomes
        q = QuantizeLinear(x, s, 128)  with s = max|x_row| / 127 per row (block_size = K), uint8
        y = MatMulIntegerToFloat(q, Wq, 1, w_scale, 128) * s
    where Wq is W in int8, symmetric per output channel (w_scale [N]). The bias Add that follows stays as it
    is. MatMuls that read the same x (query / key / value) share one q. A row's output depends only on that
    row, so logits do not change with batch mates or padding; the scale is exact per row, so no calibration
    data is needed and nothing is clipped. The row scale is a Mul of its own, not MatMulIntegerToFloat's a_scale:
    onnxruntime 1.32 applies a non-scalar a_scale to a fused bias as well (wrong logits when it fused one).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    skip = set(excluded)
    inits = {i.name: i for i in graph.initializer}
    targets = token_targets(model, skip)
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in targets:
        by_input.setdefault(n.input[0], []).append(n)
    new_inits = [numpy_helper.from_array(np.array([-1], np.int64), "tokq.axes"),
                 numpy_helper.from_array(np.array(_TINY * 127, np.float32), "tokq.floor"),
                 numpy_helper.from_array(np.array(1 / 127, np.float32), "tokq.inv127"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "tokq.one"),
                 numpy_helper.from_array(np.array(128, np.uint8), "tokq.zp"),
                 numpy_helper.from_array(np.array([128], np.uint8), "tokq.zp1")]
    before: dict[str, list[onnx.NodeProto]] = {}  # the quantize nodes of x go before its first MatMul
    for i, (x, nodes) in enumerate(by_input.items()):
        p = f"tokq.x{i}"
        k = int(inits[nodes[0].input[1]].dims[0])
        before[nodes[0].name] = [
            helper.make_node("ReduceMax", [x, "tokq.axes"], [p + ".max"], keepdims=1, name=p + ".max"),
            helper.make_node("ReduceMin", [x, "tokq.axes"], [p + ".min"], keepdims=1, name=p + ".min"),
            helper.make_node("Neg", [p + ".min"], [p + ".negmin"], name=p + ".negmin"),
            helper.make_node("Max", [p + ".max", p + ".negmin", "tokq.floor"], [p + ".absmax"], name=p + ".absmax"),
            helper.make_node("Mul", [p + ".absmax", "tokq.inv127"], [p + ".s"], name=p + ".s"),
            helper.make_node("Shape", [p + ".s"], [p + ".shape"], name=p + ".shape"),
            helper.make_node("Expand", ["tokq.zp1", p + ".shape"], [p + ".zp"], name=p + ".zp"),
            helper.make_node("QuantizeLinear", [x, p + ".s", p + ".zp"], [p + ".q"], axis=-1, block_size=k,
                             name=p + ".q"),
        ]
    prefix = {x: f"tokq.x{i}" for i, x in enumerate(by_input)}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    weights: dict[str, str] = {}  # float initializer -> quantized name (a weight read by two MatMuls is stored once)
    for n in targets:
        w_name = n.input[1]
        if w_name not in weights:
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            amax = np.abs(w).max(axis=0)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            weights[w_name] = f"tokq.w{len(weights)}"
            new_inits += [numpy_helper.from_array(q, weights[w_name] + ".q"),
                          numpy_helper.from_array(scale, weights[w_name] + ".scale")]
        p, wq = prefix[n.input[0]], weights[w_name]
        replaced[n.name] = [
            helper.make_node("MatMulIntegerToFloat", [p + ".q", wq + ".q", "tokq.one", wq + ".scale", "tokq.zp"],
                             [n.output[0] + ".tokq"], domain="com.microsoft", name=n.name + ".int8"),
            helper.make_node("Mul", [n.output[0] + ".tokq", p + ".s"], [n.output[0]], name=n.name),
        ]
    nodes = []
    for n in graph.node:
        nodes += before.get(n.name, [])
        nodes += replaced.get(n.name, [n])
    replace_nodes(model, nodes, new_inits)
    if targets and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = max(model.ir_version, 10)
    onnx.save(model, str(dst))
    return {"method": "per-token int8 (QuantizeLinear per row + MatMulIntegerToFloat)", "activations":
            "uint8, symmetric (zero point 128), one scale per token from that token's max |x|, at run time",
            "weight_type": "QInt8", "per_channel": True, "quantized_matmuls": len(targets),
            "activation_groups": len(by_input), "opset": TOKEN_OPSET, "batch_independent": True}
