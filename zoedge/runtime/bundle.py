"""A bundle opened on the device: manifest (checked against file hashes), tokenizer, initial trainables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import TRAINABLE_FILE, Manifest, verify_files
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.text import TextEncoder


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    encoder: TextEncoder

    @classmethod
    def open(cls, path: str | Path, check_files: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise ZoedgeError(f"{path}: no such bundle directory")
        manifest = Manifest.load(path)
        if check_files:
            verify_files(path, manifest)
        return cls(path, manifest, TextEncoder(path, manifest))

    def initial_trainables(self) -> dict[str, np.ndarray]:
        if not self.manifest.trainables:  # a merged bundle: its trained values are graph initializers
            return {}
        tensors = load_tensors(self.path / TRAINABLE_FILE)
        return check_trainables(self.manifest, tensors, str(self.path / TRAINABLE_FILE))


def check_trainables(manifest: Manifest, tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Same names and shapes as the manifest, float32, finite; returned in manifest order, writable."""
    out = {}
    for t in manifest.trainables:
        if t.name not in tensors:
            raise ZoedgeError(f"{where}: missing trainable tensor {t.name!r}")
        a = tensors[t.name]
        if list(a.shape) != list(t.shape):
            raise ZoedgeError(f"{where}: tensor {t.name!r} has shape {list(a.shape)}, manifest says {t.shape}")
        if not np.all(np.isfinite(a)):
            raise ZoedgeError(f"{where}: tensor {t.name!r} contains NaN or Inf")
        out[t.name] = np.ascontiguousarray(a, dtype=np.float32).copy()
    extra = set(tensors) - set(out)
    if extra:
        raise ZoedgeError(f"{where}: unexpected tensor {sorted(extra)[0]!r} (not a trainable of this bundle)")
    return out
