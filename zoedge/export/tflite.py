"""Convert a task module to TFLite (LiteRT) with its trainable tensors as signature inputs.

litert-torch traces `Positional(wrapper)`: the trainables become positional arguments after
(input_ids, attention_mask), in manifest order. The converter names a signature's inputs
`args_0..args_N` in argument order and narrows int64 token ids to int32; the mapping is recorded
in `manifest.signature` so the runtime (`zoedge.runtime.tflite_forward`) can feed the graph by
zoedge's names. Token inputs have static shapes: one signature per sequence bucket (16, 32, ...,
max_length; the weights are shared), the runtime picks the smallest bucket that fits and pads to it.

`--quant int8` is dynamic-range int8 on the converted file (ai-edge-quantizer's `dynamic_wi8_afp32`):
int8 weights of the frozen base; the trainables are inputs, so they stay float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zoedge.errors import ZoedgeError
from zoedge.export.onnx_graph import MIN_SEQ, TrainablesAsInputs, output_names
from zoedge.manifest import ATTENTION_MASK, INPUT_IDS, TensorSpec

SAMPLE_SEED = 0
DEFAULT_BATCH = 16  # rows per interpreter call; the runtime splits and pads to it
MIN_BUCKET, MAX_BUCKETS = 16, 4  # sequence buckets: max_length, max_length/2, ... down to 16, at most 4


def seq_buckets(max_length: int) -> list[int]:
    buckets = [max_length]
    while len(buckets) < MAX_BUCKETS and buckets[0] // 2 >= MIN_BUCKET:
        buckets.insert(0, buckets[0] // 2)
    return buckets


def signature_key(seq: int) -> str:
    return f"seq_{seq}"


class Positional(nn.Module):
    """TrainablesAsInputs with the trainables as positional tensors (the converter takes no dict)."""

    def __init__(self, wrapper: TrainablesAsInputs, names: list[str]):
        super().__init__()
        self.wrapper = wrapper
        self.names = list(names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *trainables: torch.Tensor):
        return self.wrapper(input_ids, attention_mask, dict(zip(self.names, trainables)))


def convert_to_tflite(wrapper: TrainablesAsInputs, task: str, trainables: dict[str, torch.Tensor], path: Path,
                      quantize: bool = False, num_labels: int = 2, hidden: int = 0, max_length: int = 64,
                      batch: int = DEFAULT_BATCH) -> tuple[list[TensorSpec], list[TensorSpec], dict, dict]:
    """Static (batch, seq) token inputs per signature: litert-torch 0.10 cannot lower HF models with a
    symbolic batch or sequence axis (its int64->int32 arange pass and jax slice lowering need sizes)."""
    try:
        import litert_torch
    except ImportError as e:
        raise ZoedgeError(f"--format tflite needs litert-torch ({e}); run scripts/tflite_env.sh and use "
                          ".venv-tflite/bin/python") from None
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its progress lines would clutter zoedge's log
    names = list(trainables)
    module = Positional(wrapper, names).eval()
    buckets = seq_buckets(max(max_length, MIN_SEQ))  # the encoder pads rows to at least MIN_SEQ tokens
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), _quiet():
        warnings.simplefilter("ignore")
        try:
            converter = litert_torch.Converter()
            for seq in buckets:
                converter.signature(signature_key(seq), module, _sample_args(trainables, batch, seq))
            converter.convert().export(str(path))
        except Exception as e:
            raise ZoedgeError(f"TFLite conversion failed: {_first_line(e)}") from e
    details: dict = {"converter": f"litert-torch {litert_torch.__version__}",
                     "convert_seconds": round(time.perf_counter() - t0, 1)}
    if quantize:
        details.update(_quantize_int8(path))
    outs = output_names(task)
    signature = describe_signature(path, [INPUT_IDS, ATTENTION_MASK, *names], outs, buckets)
    details["sample_max_abs_diff"] = max(
        check_converted(path, signature, key, module, _sample_args(trainables, batch, int(seq)),
                        tolerance=None if quantize else 1e-3) for seq, key in signature["keys"].items())
    inputs = [TensorSpec(INPUT_IDS, ["batch", "seq"], "int64"), TensorSpec(ATTENTION_MASK, ["batch", "seq"], "int64")]
    if task == "classify":
        outputs = [TensorSpec(outs[0], ["batch", num_labels], "float32"), TensorSpec(outs[1], ["batch", hidden], "float32")]
    else:
        outputs = [TensorSpec(outs[0], ["batch"], "float32"), TensorSpec(outs[1], ["batch"], "float32")]
    return inputs, outputs, signature, details


def _sample_args(trainables: dict[str, torch.Tensor], batch: int, seq: int) -> tuple:
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    ids = torch.randint(5, 100, (batch, seq), dtype=torch.long, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq // 2:] = 0
    return (ids, mask, *[t.detach().float().contiguous() for t in trainables.values()])


def describe_signature(path: Path, inputs: list[str], outputs: list[str], buckets: list[int]) -> dict:
    """What the runtime needs to feed the file by zoedge's names: signature keys by sequence length,
    name maps (the same for every signature), static batch, the largest sequence, the token dtype."""
    from zoedge.runtime.tflite_forward import load_interpreter

    interp = load_interpreter(path)
    keys = {str(seq): signature_key(seq) for seq in buckets}
    if set(interp.get_signature_list()) != set(keys.values()):
        raise ZoedgeError(f"converted TFLite signatures are {sorted(interp.get_signature_list())}, expected {sorted(keys.values())}")
    in_map = {name: f"args_{i}" for i, name in enumerate(inputs)}  # litert-torch: args_<position>
    out_map = {name: f"output_{i}" for i, name in enumerate(outputs)}
    shapes = []
    for seq, key in keys.items():
        runner = interp.get_signature_runner(key)
        got_in, got_out = runner.get_input_details(), runner.get_output_details()
        for want, have, what in ((in_map, got_in, "input"), (out_map, got_out, "output")):
            if set(want.values()) != set(have):
                raise ZoedgeError(f"TFLite signature {key} {what}s are {sorted(have)}, expected {sorted(want.values())}")
        ids = got_in[in_map[INPUT_IDS]]
        shapes.append([int(d) for d in ids.get("shape_signature", ids["shape"])])
        if shapes[-1][1] != int(seq):
            raise ZoedgeError(f"TFLite signature {key} takes {shapes[-1][1]} tokens, expected {seq}")
    return {"key": keys[str(buckets[-1])], "keys": keys, "inputs": in_map, "outputs": out_map,
            "static_batch": shapes[-1][0], "static_seq": buckets[-1], "token_dtype": np.dtype(ids["dtype"]).name}


def check_converted(path: Path, signature: dict, key: str, module: nn.Module, args: tuple,
                    tolerance: float | None) -> float:
    """The converted file vs torch on the sample batch with random non-zero trainables (so a wrong
    argument order or an adapter folded into a constant shows). Returns the max abs difference."""
    rng = np.random.default_rng(SAMPLE_SEED)
    args = (*args[:2], *[torch.from_numpy((rng.standard_normal(a.shape) * 0.05).astype(np.float32)) for a in args[2:]])
    with torch.no_grad():
        ref = [r.numpy() for r in module(*args)]
    got = _run_file(path, signature, key, args)
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    if not np.isfinite(diff) or (tolerance is not None and diff > tolerance):
        raise ZoedgeError(f"converted TFLite model disagrees with torch (max abs diff {diff:.3g})")
    return diff


def _run_file(path: Path, signature: dict, key: str, args: tuple) -> list[np.ndarray]:
    from zoedge.runtime.tflite_forward import load_interpreter

    runner = load_interpreter(path).get_signature_runner(key)
    dtype = np.dtype(signature["token_dtype"])
    feeds = {}
    for i, (name, a) in enumerate(zip(signature["inputs"], args)):
        arr = a.numpy()
        feeds[signature["inputs"][name]] = arr.astype(dtype) if i < 2 else arr
    out = runner(**feeds)
    return [out[v] for v in signature["outputs"].values()]


def verify_tflite(bundle_dir: str | Path, data: str | Path | None = None, n: int = 32, seed: int = 0) -> dict:
    """`zoedge verify` for a TFLite bundle: LiteRT vs torch, same random non-zero trainables."""
    from zoedge.export.verify import prediction_agreement, reference_inputs
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.tflite_forward import TFLiteForward

    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    wrapper, trainables, texts, ids, mask = reference_inputs(bundle, data, n, seed)
    names = [o.name for o in m.outputs]
    got = TFLiteForward(bundle.path, m, trainables)(ids, mask, tuple(names))
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), {k: torch.from_numpy(v) for k, v in trainables.items()})
    ref = [r.numpy() for r in ref]
    diff = float(max(np.abs(g - r).max() for g, r in zip(got, ref)))
    return {"max_abs_diff": diff, "prediction_agreement": prediction_agreement(m.task, got, ref), "n": len(texts),
            "quantization": m.quantization, "engine": "litert"}


def _quantize_int8(path: Path) -> dict:
    from ai_edge_quantizer import quantizer, recipe

    before = path.stat().st_size
    tmp = path.with_suffix(".int8.tflite")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        q = quantizer.Quantizer(str(path))
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        q.quantize().export_model(str(tmp), overwrite=True)
    os.replace(tmp, path)
    return {"method": "dynamic_wi8_afp32 (ai-edge-quantizer)", "fp32_bytes": before, "int8_bytes": path.stat().st_size}


class _quiet:
    """Silence the converter's Python loggers while it runs."""

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in ("torch", "absl", "litert_torch", "jax")}
        for n in self.levels:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
