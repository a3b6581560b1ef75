"""Roofline figures for a bundle's forward: the dense GEMM work its graph does per token, and the peak of a plain
GEMM of the same precision on this machine, measured by the same onnxruntime in the same process.

dense work = sum over MatMul-like nodes with a weight of known shape [K, N] (an initializer, a trainable graph
input, or a Transpose of one) of 2*K*N operations per token; attention's score and context products (S^2 terms,
no weight) are not counted, so the achieved figure is a lower bound. Precision per node:
  fp32  MatMul / Gemm / FusedMatMul on float weights
  int8  MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul (MLAS integer GEMM)
  nbits MatMulNBits (weight-only blocks, dequantized in the kernel, fp32 arithmetic at accuracy level 0)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

INT8_OPS = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
FP32_OPS = {"MatMul", "Gemm", "FusedMatMul"}


def dense_ops_per_token(model_path: str | Path) -> dict[str, int]:
    """{precision: 2*K*N summed over the weight GEMMs} for one token through the graph."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    for vi in g.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(dims):
            shapes[vi.name] = dims
    for n in g.node:  # Transpose of a known 2-D weight (LoRA factors, tied heads)
        if n.op_type == "Transpose" and n.input[0] in shapes and len(shapes[n.input[0]]) == 2:
            shapes[n.output[0]] = shapes[n.input[0]][::-1]
    out: dict[str, int] = {"fp32": 0, "int8": 0, "nbits": 0}
    for n in g.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            out["nbits"] += 2 * a["K"] * a["N"]
        elif n.op_type in FP32_OPS | INT8_OPS and len(n.input) > 1 and len(shapes.get(n.input[1], [])) == 2:
            k, m = shapes[n.input[1]]
            trans_b = any(x.name == "transB" and x.i for x in n.attribute)
            out["int8" if n.op_type in INT8_OPS else "fp32"] += 2 * k * m if not trans_b else 2 * m * k
    return {k: v for k, v in out.items() if v}


def _model(nodes, inits, inputs):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "gemm", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def gemm_peak(precision: str, m: int, k: int, n: int, threads: int, seconds: float = 1.0) -> dict:
    """GOP/s of one [m, k] x [k, n] GEMM node of `precision` (fp32 | int8 | nbits), at its fastest run over
    ~`seconds` (the least disturbed by other load: a peak is what the machine can do)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    if precision == "int8":  # the activations arrive quantized: the pure integer GEMM, as the bundle's kernel runs it
        wq = np.clip(np.round(w / 0.001), -127, 127).astype(np.int8)
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n, 1e-3, np.float32), "ws"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        node = helper.make_node("MatMulIntegerToFloat", ["x", "wq", "xs", "ws", "xz"], ["y"], domain="com.microsoft")
        x = rng.integers(0, 255, (m, k), dtype=np.uint8)
        model = _model([node], inits, [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])])
    elif precision in ("fp32", "nbits"):
        x = rng.standard_normal((m, k)).astype(np.float32)
        model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [numpy_helper.from_array(w, "w")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])])
        if precision == "nbits":  # the weight-only MatMulNBits the llama int8-weight bundles use (8 bit, block 32)
            from onnxruntime.quantization import matmul_nbits_quantizer as mnb

            q = mnb.MatMulNBitsQuantizer(model, algo_config=mnb.DefaultWeightOnlyQuantConfig(
                block_size=32, is_symmetric=True, bits=8))
            q.process()
            model = q.model.model
    else:
        raise ValueError(f"unknown precision {precision!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    sess.run(None, feed)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    med, best = float(np.median(times)), float(np.min(times))
    return {"precision": precision, "shape": [m, k, n], "threads": threads, "median_ms": round(med * 1e3, 3),
            "min_ms": round(best * 1e3, 3), "gops": round(2 * m * k * n / best / 1e9, 1)}


def achieved(ops_per_token: dict[str, int], tokens: int, forward_ms: float) -> float:
    """GOP/s of the dense work of one forward over `tokens` (batch x padded length) in `forward_ms`."""
    return round(sum(ops_per_token.values()) * tokens / (forward_ms / 1e3) / 1e9, 1)
