"""Crash-safe checkpoints: one safetensors file, written to a temporary, fsynced, then renamed.

Holds the trainable tensors, optimizer buffers, the head-start tensors, the best tensors so far, the
trajectory so far, and a JSON state (step, lr scale, guard state, metrics history, config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from zoedge.errors import ZoedgeError
from zoedge.fsio import write_bytes_atomic
from zoedge.runtime.tensors import load_tensors

CHECKPOINT_FILE = "checkpoint.safetensors"
_GROUPS = {"t": "tensors", "o": "optimizer", "s": "start", "b": "best"}


def save_checkpoint(out: Path, groups: dict[str, dict[str, np.ndarray]], trajectory: np.ndarray,
                    state: dict[str, Any]) -> Path:
    flat = {f"{prefix}/{k}": np.ascontiguousarray(v) for prefix, g in _GROUPS.items() for k, v in groups[g].items()}
    flat["trajectory"] = np.ascontiguousarray(trajectory, dtype=np.float32)
    data = save(flat, metadata={"state": json.dumps(state, sort_keys=True)})
    path = out / CHECKPOINT_FILE
    write_bytes_atomic(path, data)
    return path


def load_checkpoint(out: Path) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, dict[str, Any]]:
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise ZoedgeError(f"{out}: no checkpoint to resume from ({CHECKPOINT_FILE} missing)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            state = json.loads((f.metadata() or {})["state"])
    except Exception as e:
        raise ZoedgeError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:120]})") from None
    flat = load_tensors(path)
    groups: dict[str, dict[str, np.ndarray]] = {g: {} for g in _GROUPS.values()}
    for key, value in flat.items():
        if key == "trajectory":
            continue
        prefix, name = key.split("/", 1)
        groups[_GROUPS[prefix]][name] = value.copy()
    return groups, flat["trajectory"].copy(), state
