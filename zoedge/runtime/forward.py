"""Forward passes with the trainable tensors bound zero-copy.

Each trainable numpy array is wrapped once in an OrtValue that shares its memory and bound to the
session's IOBinding; the optimizer then mutates the arrays in place and every run sees the new values.
Only the token inputs are re-bound per call.

Bundles exported with a copies axis (`export --copies C`) bind one (C, ...) buffer per trainable
instead: `load_perturbations` fills copy 2i with θ+εz_i and 2i+1 with θ-εz_i for a batched ZO step;
any other call first broadcasts θ into every copy and spreads the rows over the copies.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from zoedge.constants import HEAP_TRIM_EVERY
from zoedge.manifest import ATTENTION_MASK, INPUT_IDS
from zoedge.runtime.memory import release_free_heap


class BoundForward:
    def __init__(self, session: ort.InferenceSession, trainables: dict[str, np.ndarray], copies: int = 0):
        self.session = session
        self.trainables = trainables
        self.copies = copies
        self.io = session.io_binding()
        self._values = []  # keep the OrtValues (and so the shared buffers) alive
        self.buffers = {k: np.empty((copies, *v.shape), np.float32) for k, v in trainables.items()} if copies else trainables
        for name, arr in self.buffers.items():
            assert arr.flags.c_contiguous and arr.dtype == np.float32, name
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            self._values.append(value)
            self.io.bind_ortvalue_input(name, value)
        self.calls = 0
        self.examples = 0

    def load_perturbations(self, directions: list[dict[str, np.ndarray]], eps: float) -> None:
        """Copy 2i <- θ+εz_i, copy 2i+1 <- θ-εz_i; tensors without a direction are left unperturbed. εz_i is
        computed once, into copy 2i+1 itself, which then becomes θ - εz_i (no temporary array)."""
        s = np.float32(eps)
        for i, z in enumerate(directions):
            for name, theta in self.trainables.items():
                if name in z:
                    plus, minus = self.buffers[name][2 * i], self.buffers[name][2 * i + 1]
                    np.multiply(z[name], s, out=minus)
                    np.add(theta, minus, out=plus)
                    np.subtract(theta, minus, out=minus)
                else:
                    self.buffers[name][2 * i] = theta
                    self.buffers[name][2 * i + 1] = theta

    def run_copies(self, ids: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        """One forward of the same batch under every copy's tensors; outputs shaped (copies, batch, ...)."""
        c = self.copies
        outs = self._run(np.tile(ids, (c, 1)), np.tile(mask, (c, 1)), outputs)
        return [o.reshape(c, ids.shape[0], *o.shape[1:]) for o in outs]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        if not self.copies:
            return self._run(ids, mask, outputs)
        for name, theta in self.trainables.items():
            self.buffers[name][:] = theta
        n = ids.shape[0]
        pad = (-n) % self.copies
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
        return [o[:n] for o in self._run(ids, mask, outputs)]

    def _run(self, ids: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        self.io.bind_cpu_input(INPUT_IDS, ids)
        self.io.bind_cpu_input(ATTENTION_MASK, mask)
        self.io.clear_binding_outputs()
        for name in outputs:
            self.io.bind_output(name)
        self.session.run_with_iobinding(self.io)
        self.calls += 1
        self.examples += ids.shape[0]
        outs = self.io.copy_outputs_to_cpu()
        if self.calls % HEAP_TRIM_EVERY == 0:  # fragmented free heap would otherwise pile up (constants.py)
            release_free_heap()
        return outs


def open_forward(bundle, tensors: dict[str, np.ndarray]):
    """The forward engine for a bundle: onnxruntime (ONNX or ORT format) or LiteRT (TFLite).

    Every engine has the same call shape (ids, mask, outputs) -> arrays and reads the trainable arrays
    that the optimizer mutates in place, so the ZO code does not care which engine runs the forward.
    """
    m = bundle.manifest
    if m.model_format == "tflite":
        from zoedge.runtime.tflite_forward import TFLiteForward

        return TFLiteForward(bundle.path, m, tensors)
    from zoedge.runtime.engine import create_session

    return BoundForward(create_session(bundle.path, m), tensors, copies=m.copies)
