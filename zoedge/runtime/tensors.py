"""Named float32 tensors: load/save with safetensors, a content hash that does not depend on the file format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save, save_file

from zoedge.errors import ZoedgeError
from zoedge.fsio import make_ordinary


def tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(name.encode())
        h.update(a.dtype.str.encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def load_tensors(path: str | Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ZoedgeError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None


def save_tensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    make_ordinary(path)  # safetensors creates its files 0600


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """The safetensors file for `tensors` (PEFT's metadata {"format": "pt"}), to write atomically."""
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})


def peak_abs(a: np.ndarray) -> float:
    """max |a| without a full-size temporary (NaN propagates; 0 for an empty array)."""
    return max(float(a.max(initial=-np.inf)), -float(a.min(initial=np.inf)), 0.0)
