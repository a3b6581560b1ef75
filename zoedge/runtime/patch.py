"""A patch: what training produced, in two interchangeable forms.

Patch directory:
    patch.json                  zoedge metadata (bundle, base and initial hashes, steps, metrics, hyper-parameters,
                                the ZO config and run seed needed for replay, sha256 of every file)
    adapter_model.safetensors   trained tensors under their PEFT keys (the bundle's trainable names)
    adapter_config.json         PEFT LoraConfig (only when the bundle has LoRA), so the directory loads with
                                peft.PeftModel.from_pretrained
    trajectory.npy              float32 rows [g_1..g_q, lr], one per step: replaying it from the bundle's
                                initial tensors (+ start.safetensors) rebuilds adapter_model.safetensors exactly
    start.safetensors           tensors set before ZO began (the linear-probe head), if any: a few KB

numpy + safetensors only.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.fsio import write_bytes_atomic, write_json_atomic
from zoedge.manifest import Manifest, sha256_file
from zoedge.runtime.tensors import load_tensors, safetensors_bytes, tensor_digest
from zoedge.runtime.zo import OPTIMIZERS, ZOConfig, replay

PATCH_FILE = "patch.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TRAJECTORY_FILE = "trajectory.npy"
START_FILE = "start.safetensors"
PATCH_FORMAT = "zoedge-patch/1"
PATCH_FILES = (PATCH_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, TRAJECTORY_FILE, START_FILE)


def adapter_config(manifest: Manifest) -> dict[str, Any] | None:
    if manifest.lora is None:
        return None
    heads = sorted({t.module for t in manifest.trainables if t.role == "head"})
    return {
        "peft_type": "LORA", "task_type": None, "r": manifest.lora.rank, "lora_alpha": manifest.lora.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": r".*\.(" + "|".join(manifest.lora.target_modules) + r")$",
        "modules_to_save": heads or None, "base_model_name_or_path": manifest.model_id, "init_lora_weights": True,
        "revision": None,
    }


def write_patch(out: Path, manifest: Manifest, tensors: dict[str, np.ndarray], trajectory: np.ndarray,
                start: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """Write every file to temporaries, then rename into place; patch.json last (it marks the patch complete)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PATCH_FILE).unlink(missing_ok=True)  # an incomplete patch has no patch.json
    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        write_bytes_atomic(out / name, data)
        files[name] = sha256_file(out / name)

    put(ADAPTER_FILE, safetensors_bytes(tensors))
    if start:
        put(START_FILE, safetensors_bytes(start))
    else:
        (out / START_FILE).unlink(missing_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(trajectory, dtype="<f4"))
    put(TRAJECTORY_FILE, buf.getvalue())
    cfg = adapter_config(manifest)
    if cfg is not None:
        write_json_atomic(out / ADAPTER_CONFIG_FILE, cfg)
        files[ADAPTER_CONFIG_FILE] = sha256_file(out / ADAPTER_CONFIG_FILE)
    doc = {
        "format": PATCH_FORMAT, "bundle_id": manifest.bundle_id, "model_id": manifest.model_id,
        "base_sha256": manifest.base_sha256, "initial_sha256": manifest.initial_sha256,
        "adapter_sha256": tensor_digest(tensors), "files": files, **meta,
    }
    write_json_atomic(out / PATCH_FILE, doc)  # last: its presence marks a complete patch
    return doc


def read_patch(patch_dir: str | Path, require_all: bool = True) -> dict[str, Any]:
    """patch.json, after checking every listed file that is present against its sha256. An uploaded patch
    carries only its format's files, so `require_all=False` accepts absent ones."""
    doc = load_patch_doc(patch_dir)
    for name, digest in doc["files"].items():
        f = Path(patch_dir) / name
        if not f.is_file():
            if require_all:
                raise ZoedgeError(f"{patch_dir}: {name} is missing")
            continue
        if sha256_file(f) != digest:
            raise ZoedgeError(f"{patch_dir}: {name} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")
    return doc


def load_patch_doc(patch_dir: str | Path) -> dict[str, Any]:
    """patch.json parsed and its format checked; no file hashes checked."""
    p = Path(patch_dir) / PATCH_FILE
    if not p.is_file():
        raise ZoedgeError(f"{patch_dir}: not a zoedge patch (no {PATCH_FILE})")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZoedgeError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != PATCH_FORMAT:
        raise ZoedgeError(f"{p}: unknown patch format {doc.get('format') if isinstance(doc, dict) else None!r}")
    if not isinstance(doc.get("files"), dict):
        raise ZoedgeError(f"{p}: no 'files' table")
    return doc


def check_patch_fits(doc: dict[str, Any], manifest: Manifest, where: str) -> None:
    if doc.get("base_sha256") != manifest.base_sha256:
        raise ZoedgeError(f"{where}: patch was made for another base model "
                          f"({str(doc.get('model_id'))}, base {str(doc.get('base_sha256'))[:12]}), "
                          f"bundle has {manifest.model_id} base {manifest.base_sha256[:12]}")
    if doc.get("initial_sha256") and doc["initial_sha256"] != manifest.initial_sha256:
        raise ZoedgeError(f"{where}: patch starts from other initial trainables than this bundle's")
    prompt_of(doc, where)


def prompt_of(doc: dict[str, Any], where: str = PATCH_FILE) -> str | None:
    """The prompt template a decoder patch was trained through (None: the bundle's own)."""
    template = doc.get("prompt_template")
    if template is not None and not (isinstance(template, str) and "{sentence}" in template):
        raise ZoedgeError(f"{where}: prompt_template must be a string containing {{sentence}}")
    return template


def load_patch_tensors(patch_dir: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    from zoedge.runtime.bundle import check_trainables

    doc = read_patch(patch_dir)
    check_patch_fits(doc, manifest, str(patch_dir))
    return check_trainables(manifest, load_tensors(Path(patch_dir) / ADAPTER_FILE), str(Path(patch_dir) / ADAPTER_FILE))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_replay_fields(patch_dir: Path, doc: dict[str, Any]) -> None:
    """What replay reads from patch.json and trajectory.npy, type-checked, so a malformed (or hostile) patch is
    a one-line ZoedgeError (CLI) / 400 (server) rather than a KeyError / TypeError deep inside replay."""
    seed = doc.get("run_seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ZoedgeError(f"{PATCH_FILE}: 'run_seed' must be a non-negative integer (got {seed!r})")
    zo = doc.get("zo")
    if not isinstance(zo, dict):
        raise ZoedgeError(f"{PATCH_FILE}: 'zo' (the ZO configuration needed for replay) must be an object")
    if zo.get("optimizer", "zo-sgd") not in OPTIMIZERS:
        raise ZoedgeError(f"{PATCH_FILE}: zo.optimizer {zo.get('optimizer')!r} is not one of {', '.join(OPTIMIZERS)}")
    q = zo.get("perturbations", 1)
    if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 4096:
        raise ZoedgeError(f"{PATCH_FILE}: zo.perturbations must be an integer >= 1 (got {q!r})")
    for key in ("eps", "weight_decay", "momentum", "beta2", "adam_eps", "clip"):
        if key in zo and not _number(zo[key]):
            raise ZoedgeError(f"{PATCH_FILE}: zo.{key} must be a finite number (got {zo[key]!r})")
    if "inplace" in zo and not isinstance(zo["inplace"], bool):
        raise ZoedgeError(f"{PATCH_FILE}: zo.inplace must be true or false")
    roles = zo.get("roles")
    if roles is not None and not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
        raise ZoedgeError(f"{PATCH_FILE}: zo.roles must be a list of role names or null")
    if "generator" in zo and not isinstance(zo["generator"], str):
        raise ZoedgeError(f"{PATCH_FILE}: zo.generator must be a string")
    traj = patch_dir / TRAJECTORY_FILE
    if traj.is_file():
        try:
            a = np.load(traj, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise ZoedgeError(f"{patch_dir}: unreadable {TRAJECTORY_FILE} ({str(e)[:120]})") from None
        if a.dtype.kind not in "fiu":
            raise ZoedgeError(f"{patch_dir}: {TRAJECTORY_FILE} holds {a.dtype} values, expected float32 numbers")


def replay_patch(patch_dir: str | Path, bundle_dir: str | Path, check_bundle_files: bool = True) -> dict[str, np.ndarray]:
    """Rebuild the trained tensors from the bundle's initial tensors and the patch's trajectory (numpy only).
    Needs only patch.json, trajectory.npy and start.safetensors (if listed) from the patch."""
    from zoedge.runtime.bundle import Bundle, check_trainables

    bundle = Bundle.open(bundle_dir, check_files=check_bundle_files)
    m = bundle.manifest
    doc = read_patch(patch_dir, require_all=False)
    check_patch_fits(doc, m, str(patch_dir))
    check_replay_fields(Path(patch_dir), doc)
    for needed in (TRAJECTORY_FILE, *([START_FILE] if START_FILE in doc["files"] else [])):
        if not (Path(patch_dir) / needed).is_file():
            raise ZoedgeError(f"{patch_dir}: {needed} is missing; cannot replay")
    tensors = bundle.initial_trainables()
    start_path = Path(patch_dir) / START_FILE
    if start_path.is_file():
        for k, v in load_tensors(start_path).items():
            if k not in tensors or tensors[k].shape != v.shape:
                raise ZoedgeError(f"{start_path}: tensor {k!r} does not fit the bundle")
            tensors[k] = np.ascontiguousarray(v, dtype=np.float32).copy()
    try:
        traj = np.load(Path(patch_dir) / TRAJECTORY_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ZoedgeError(f"{patch_dir}: unreadable {TRAJECTORY_FILE} ({e})") from None
    z = doc.get("zo") or {}
    cfg = ZOConfig(**{k: v for k, v in z.items() if k in ZOConfig.__dataclass_fields__})
    if traj.ndim != 2 or traj.shape[1] != cfg.perturbations + 1:
        raise ZoedgeError(f"{patch_dir}: trajectory has shape {traj.shape}, expected (steps, {cfg.perturbations + 1})")
    if traj.shape[0] != doc.get("steps"):
        raise ZoedgeError(f"{patch_dir}: trajectory has {traj.shape[0]} steps, patch.json says {doc.get('steps')}")
    roles = {t.name: t.role for t in m.trainables}
    replay(cfg.select(tensors, roles), cfg, roles, int(doc["run_seed"]), traj)
    return check_trainables(m, tensors, "replayed tensors")
