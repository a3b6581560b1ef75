"""Trace a task module to ONNX with its trainable tensors as graph inputs.

The wrapper calls the module through `torch.func.functional_call`, substituting the trainable
parameters with forward arguments; every other parameter stays an initializer (so it can be
constant-folded and quantized). Uses torch.export + the dynamo ONNX exporter with dynamic batch and
sequence axes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from zoedge.errors import ZoedgeError
from zoedge.manifest import (
    ATTENTION_MASK, INPUT_IDS, OUTPUT_FEATURES, OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS, TensorSpec,
)

OPSET = 18
MIN_SEQ = 3  # the runtime pads every batch to at least this many tokens


class TrainablesAsInputs(nn.Module):
    def __init__(self, module: nn.Module, param_names: dict[str, str]):
        super().__init__()
        self.module = module
        self.param_names = param_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, trainables: dict[str, torch.Tensor]):
        params = {self.param_names[k]: v for k, v in trainables.items()}
        return functional_call(self.module, params, (input_ids, attention_mask), strict=False, tie_weights=True)


def output_names(task: str) -> list[str]:
    return [OUTPUT_LOGITS, OUTPUT_FEATURES] if task == "classify" else [OUTPUT_NLL, OUTPUT_TOKENS]


def export_onnx(wrapper: TrainablesAsInputs, task: str, trainables: dict[str, torch.Tensor], path: Path,
                num_labels: int, hidden: int, max_seq: int, copies: int = 0) -> tuple[list[TensorSpec], list[TensorSpec]]:
    rows = 2 * max(copies, 1)
    ids = torch.randint(5, 100, (rows, 8), dtype=torch.long)
    mask = torch.ones(rows, 8, dtype=torch.long)
    mask[1::2, 6:] = 0
    if copies:  # batch = copies x per-copy rows
        trainables = {k: v.unsqueeze(0).repeat(copies, *[1] * v.dim()).contiguous() for k, v in trainables.items()}
        batch = copies * torch.export.Dim("rows_per_copy")
    else:
        batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", min=MIN_SEQ, max=max_seq)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
               "trainables": {k: None for k in trainables}}
    names = [INPUT_IDS, ATTENTION_MASK, *trainables]
    outs = output_names(task)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            program = torch.export.export(wrapper, (ids, mask, dict(trainables)), dynamic_shapes=dynamic, strict=False)
            onnx_program = torch.onnx.export(program, (), input_names=names, output_names=outs, dynamo=True,
                                             opset_version=OPSET, verbose=False)
        except Exception as e:
            raise ZoedgeError(f"ONNX export failed: {_first_line(e)}") from e
        onnx_program.save(str(path), external_data=False)
    inputs = [TensorSpec(INPUT_IDS, ["batch", "seq"], "int64"), TensorSpec(ATTENTION_MASK, ["batch", "seq"], "int64")]
    if task == "classify":
        outputs = [TensorSpec(OUTPUT_LOGITS, ["batch", num_labels], "float32"),
                   TensorSpec(OUTPUT_FEATURES, ["batch", hidden], "float32")]
    else:
        outputs = [TensorSpec(OUTPUT_NLL, ["batch"], "float32"), TensorSpec(OUTPUT_TOKENS, ["batch"], "float32")]
    return inputs, outputs


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
