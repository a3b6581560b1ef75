"""Which files of a patch directory travel in each upload format, and checking a (partial) patch directory.

    adapter     patch.json + adapter_model.safetensors (+ adapter_config.json, start.safetensors if present)
    trajectory  patch.json + trajectory.npy (+ start.safetensors if present): a few KB; the server
                replays it against the bundle to rebuild the adapter

An uploaded archive holds only its format's files: `inspect_patch_dir` checks the files present
against their sha256 (`read_patch(require_all=False)`) and that the format's own files are there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest, sha256_file
from zoedge.runtime.patch import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, PATCH_FILE, START_FILE, TRAJECTORY_FILE, adapter_config, load_patch_doc,
    read_patch, replay_patch, write_json_atomic,
)
from zoedge.runtime.tensors import save_tensors, tensor_digest

FORMATS = ("adapter", "trajectory")
FORMAT_FILES = {
    "adapter": (PATCH_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, START_FILE),
    "trajectory": (PATCH_FILE, TRAJECTORY_FILE, START_FILE),
}
REQUIRED_FILES = {"adapter": (PATCH_FILE, ADAPTER_FILE), "trajectory": (PATCH_FILE, TRAJECTORY_FILE)}
PATCH_FILES = (PATCH_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, TRAJECTORY_FILE, START_FILE)


def format_files(patch_dir: str | Path, fmt: str) -> list[str]:
    """The files of patch_dir that an upload in format fmt carries (checked to exist)."""
    if fmt not in FORMATS:
        raise ZoedgeError(f"bad --format {fmt!r}: choose adapter or trajectory")
    patch_dir = Path(patch_dir)
    doc = load_patch_json(patch_dir)
    names = [n for n in FORMAT_FILES[fmt] if (patch_dir / n).is_file()]
    for n in REQUIRED_FILES[fmt]:
        if n not in names:
            raise ZoedgeError(f"{patch_dir}: has no {n}, needed for a {fmt} upload")
    if fmt == "adapter" and ADAPTER_CONFIG_FILE in doc.get("files", {}) and ADAPTER_CONFIG_FILE not in names:
        raise ZoedgeError(f"{patch_dir}: has no {ADAPTER_CONFIG_FILE}, which patch.json lists")
    return names


def check_carried_files(patch_dir: str | Path, names: list[str]) -> None:
    """Refuse locally what the server would refuse: never queue a corrupt or edited patch."""
    patch_dir = Path(patch_dir)
    doc = load_patch_json(patch_dir)
    for n in names:
        if n == PATCH_FILE:
            continue
        if n not in doc["files"]:
            raise ZoedgeError(f"{patch_dir}: {n} is not listed in {PATCH_FILE}")
        if sha256_file(patch_dir / n) != doc["files"][n]:
            raise ZoedgeError(f"{patch_dir}: {n} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")


def load_patch_json(patch_dir: str | Path) -> dict[str, Any]:
    """patch.json of a (possibly partial) patch directory, parsed; file hashes are checked by the caller."""
    return load_patch_doc(patch_dir)


def inspect_patch_dir(patch_dir: str | Path) -> tuple[dict[str, Any], str]:
    """(patch.json, format) of a directory holding an upload's files; every file present must be listed
    in patch.json with its sha256. The format is adapter when the adapter tensors are there, else trajectory."""
    patch_dir = Path(patch_dir)
    doc = load_patch_json(patch_dir)
    listed: dict[str, str] = doc["files"]
    present = sorted(p.name for p in patch_dir.iterdir() if p.is_file() and p.name != PATCH_FILE)
    for name in present:
        if name not in listed:
            raise ZoedgeError(f"{name} is not listed in {PATCH_FILE}")
        if sha256_file(patch_dir / name) != listed[name]:
            raise ZoedgeError(f"{name} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")
    fmt = "adapter" if ADAPTER_FILE in present else "trajectory"
    for name in REQUIRED_FILES[fmt]:
        if name != PATCH_FILE and name not in present:
            raise ZoedgeError(f"the upload has neither {ADAPTER_FILE} nor {TRAJECTORY_FILE}")
    if fmt == "adapter" and ADAPTER_CONFIG_FILE in listed and ADAPTER_CONFIG_FILE not in present:
        raise ZoedgeError(f"{ADAPTER_CONFIG_FILE} is listed in {PATCH_FILE} but missing")
    for key in ("steps", "examples"):
        if not isinstance(doc.get(key, 0), int) or doc.get(key, 0) < 0:
            raise ZoedgeError(f"{PATCH_FILE}: {key!r} must be a non-negative integer")
    if not isinstance(doc.get("metrics", {}), dict):
        raise ZoedgeError(f"{PATCH_FILE}: 'metrics' must be an object")
    return doc, fmt


def complete_patch_dir(patch_dir: str | Path, bundle_dir: str | Path) -> dict[str, Any]:
    """Rebuild adapter_model.safetensors (+ adapter_config.json) of a trajectory patch in place by replaying
    it against the bundle; the result is byte-identical to the trainer's and passes `read_patch`."""
    patch_dir, bundle_dir = Path(patch_dir), Path(bundle_dir)
    doc = load_patch_json(patch_dir)
    if doc.get("kind") == "global":
        raise ZoedgeError(f"{patch_dir}: a global (aggregated) patch has no trajectory to replay; "
                          f"use its {ADAPTER_FILE}")
    tensors = replay_patch(patch_dir, bundle_dir)
    if tensor_digest(tensors) != doc.get("adapter_sha256"):
        raise ZoedgeError(f"replaying {TRAJECTORY_FILE} does not give the tensors of adapter_sha256 in {PATCH_FILE}")
    save_tensors(tensors, patch_dir / ADAPTER_FILE, metadata={"format": "pt"})  # as write_patch does
    config = adapter_config(Manifest.load(bundle_dir))
    if ADAPTER_CONFIG_FILE in doc["files"] and config is not None:
        write_json_atomic(patch_dir / ADAPTER_CONFIG_FILE, config)
    return read_patch(patch_dir)  # every listed file now present and matching
