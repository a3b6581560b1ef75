"""Forward passes of a TFLite bundle through a LiteRT interpreter's signature runner.

Same call shape as `BoundForward` (ids, mask, outputs) -> arrays, so the ZO trainer does not care
which engine runs. The trainable arrays are read at every call (the optimizer mutates them in place;
LiteRT copies inputs in, so nothing can be bound zero-copy). The converter gives static shapes, one
signature per sequence bucket: a call runs the smallest bucket that fits its width, split into chunks of
the signature's batch (the last chunk padded by repeating its last row), every row padded with
masked-out tokens; outputs are trimmed back to the real rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import ATTENTION_MASK, INPUT_IDS, Manifest


def load_interpreter(path: str | Path, threads: int | None = None):
    """A LiteRT interpreter: `ai_edge_litert`, else the older `tflite_runtime`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ZoedgeError("a TFLite bundle needs the LiteRT runtime: pip install ai-edge-litert "
                              "(or run scripts/tflite_env.sh and use .venv-tflite)") from None
    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as e:
        raise ZoedgeError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:160]})") from None


class TFLiteForward:
    def __init__(self, bundle_dir: str | Path, manifest: Manifest, trainables: dict[str, np.ndarray],
                 threads: int | None = None):
        path = Path(bundle_dir) / manifest.model_file
        if not path.is_file():
            raise ZoedgeError(f"{bundle_dir}: missing {manifest.model_file}")
        sig = manifest.signature
        for key in ("key", "inputs", "outputs"):
            if key not in sig:
                raise ZoedgeError(f"{bundle_dir}: manifest.signature has no {key!r} (not a zoedge TFLite bundle?)")
        threads = threads or int(os.environ.get("ZOEDGE_THREADS", "0") or 0) or None
        self.interpreter = load_interpreter(path, threads)
        keys = sig.get("keys") or {str(sig.get("static_seq") or 0): sig["key"]}  # seq bucket -> signature key
        try:
            self.runners = {int(seq): self.interpreter.get_signature_runner(key) for seq, key in sorted(
                keys.items(), key=lambda kv: int(kv[0]))}
        except ValueError:
            raise ZoedgeError(f"{path}: a signature of {sorted(keys.values())} is missing") from None
        self.in_names, self.out_names = dict(sig["inputs"]), dict(sig["outputs"])
        self.batch = sig.get("static_batch")
        self.token_dtype = np.dtype(sig.get("token_dtype", "int32"))
        details = next(iter(self.runners.values())).get_input_details()
        for t in manifest.trainables:
            d = details.get(self.in_names.get(t.name, ""))
            if d is None:
                raise ZoedgeError(f"{bundle_dir}: manifest trainable {t.name!r} is not an input of {manifest.model_file}")
            if list(d["shape"]) != list(t.shape):
                raise ZoedgeError(f"{bundle_dir}: trainable {t.name!r} has shape {t.shape} in the manifest but "
                                  f"{list(d['shape'])} in {manifest.model_file}")
        self.trainables = trainables
        self.copies = 0
        self.calls = 0
        self.examples = 0

    def __call__(self, ids: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        n, width = ids.shape
        seq = next((s for s in self.runners if s == 0 or s >= width), None)  # 0: a dynamic sequence axis
        if seq is None:
            raise ZoedgeError(f"a batch of {width} tokens does not fit this TFLite bundle's "
                              f"{max(self.runners)}-token signature")
        runner = self.runners[seq]
        if seq:
            ids, mask = _pad_cols(ids, seq), _pad_cols(mask, seq)
        chunk = self.batch or n
        parts: list[list[np.ndarray]] = []
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            out = self._run(runner, _pad_rows(ids[start:start + rows], chunk), _pad_rows(mask[start:start + rows], chunk))
            parts.append([out[self.out_names[name]][:rows] for name in outputs])
            self.examples += rows
        return [np.concatenate(p) for p in zip(*parts)]

    def _run(self, runner, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {self.in_names[INPUT_IDS]: ids.astype(self.token_dtype, copy=False),
                 self.in_names[ATTENTION_MASK]: mask.astype(self.token_dtype, copy=False)}
        for name, arr in self.trainables.items():
            feeds[self.in_names[name]] = arr
        self.calls += 1
        return runner(**feeds)


def _pad_cols(a: np.ndarray, width: int) -> np.ndarray:
    """Right-pad with zeros (pad token id 0, mask 0) to `width` columns."""
    if a.shape[1] == width:
        return a
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Repeat the last row up to `rows` rows (a real row: no all-masked rows whose outputs are NaN)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])
