"""Which files of a patch directory travel in each upload format, and checking a (partial) patch directory.

    adapter     patch.json + adapter_model.safetensors (+ adapter_config.json, start.safetensors if present)
    trajectory  patch.json + trajectory.npy (+ start.safetensors if present): a few KB; the server
                replays it against the bundle to rebuild the adapter

`zoedge.runtime.patch.read_patch` wants every file patch.json lists; an uploaded archive holds only
its format's files, so `inspect_patch_dir` checks the files that are present against their sha256
and the ones the format needs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest, sha256_file
from zoedge.runtime.patch import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, PATCH_FILE, PATCH_FORMAT, START_FILE, TRAJECTORY_FILE, adapter_config,
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


def load_patch_json(patch_dir: str | Path) -> dict[str, Any]:
    p = Path(patch_dir) / PATCH_FILE
    if not p.is_file():
        raise ZoedgeError(f"{patch_dir}: not a zoedge patch (no {PATCH_FILE})")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZoedgeError(f"{PATCH_FILE}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != PATCH_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ZoedgeError(f"{PATCH_FILE}: unknown patch format {found!r} (expected {PATCH_FORMAT})")
    if not isinstance(doc.get("files"), dict):
        raise ZoedgeError(f"{PATCH_FILE}: no 'files' table")
    return doc


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
    # read_patch (inside replay_patch) wants every listed file: give it the uploaded ones only.
    with tempfile.TemporaryDirectory(dir=patch_dir.parent) as scratch:
        present = [n for n in (TRAJECTORY_FILE, START_FILE) if (patch_dir / n).is_file()]
        for name in present:
            shutil.copyfile(patch_dir / name, Path(scratch) / name)
        partial = dict(doc, files={n: doc["files"][n] for n in present if n in doc["files"]})
        (Path(scratch) / PATCH_FILE).write_text(json.dumps(partial), encoding="utf-8")
        tensors = replay_patch(scratch, bundle_dir)
    if tensor_digest(tensors) != doc.get("adapter_sha256"):
        raise ZoedgeError(f"replaying {TRAJECTORY_FILE} does not give the tensors of adapter_sha256 in {PATCH_FILE}")
    save_tensors(tensors, patch_dir / ADAPTER_FILE, metadata={"format": "pt"})  # as write_patch does
    config = adapter_config(Manifest.load(bundle_dir))
    if ADAPTER_CONFIG_FILE in doc["files"] and config is not None:
        write_json_atomic(patch_dir / ADAPTER_CONFIG_FILE, config)
    return read_patch(patch_dir)  # every listed file now present and matching
