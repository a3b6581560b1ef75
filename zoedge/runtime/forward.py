"""Forward passes with the trainable tensors bound zero-copy.

Each trainable numpy array is wrapped once in an OrtValue that shares its memory and bound to the
session's IOBinding; the optimizer then mutates the arrays in place and every run sees the new values.
Only the token inputs are re-bound per call.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from zoedge.manifest import ATTENTION_MASK, INPUT_IDS


class BoundForward:
    def __init__(self, session: ort.InferenceSession, trainables: dict[str, np.ndarray]):
        self.session = session
        self.trainables = trainables
        self.io = session.io_binding()
        self._values = []  # keep the OrtValues (and so the shared buffers) alive
        for name, arr in trainables.items():
            assert arr.flags.c_contiguous and arr.dtype == np.float32, name
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            self._values.append(value)
            self.io.bind_ortvalue_input(name, value)
        self.calls = 0
        self.examples = 0

    def __call__(self, ids: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        self.io.bind_cpu_input(INPUT_IDS, ids)
        self.io.bind_cpu_input(ATTENTION_MASK, mask)
        self.io.clear_binding_outputs()
        for name in outputs:
            self.io.bind_output(name)
        self.session.run_with_iobinding(self.io)
        self.calls += 1
        self.examples += ids.shape[0]
        return self.io.copy_outputs_to_cpu()
