"""A patch: what training produced, in two interchangeable forms.

Patch directory:
    patch.json                  zoedge metadata, a zoedge.patchdoc.PatchDoc (bundle, base and initial hashes, labels,
                                trainables, steps, metrics, hyper-parameters, the ZO config and run seed needed
                                for replay, sha256 of every file)
    adapter_model.safetensors   trained tensors under their PEFT keys (the bundle's trainable names)
    adapter_config.json         PEFT LoraConfig (only when the bundle has LoRA), so the directory loads with
                                peft.PeftModel.from_pretrained
    trajectory.npy              float32 rows [g_1..g_q, lr], one per step: replaying it from the bundle's
                                initial tensors (+ start.safetensors) rebuilds adapter_model.safetensors exactly
    coefficients.npy            instead of the trajectory, in a seed-pool patch (--seed-pool K): float32 (K,);
                                θ0 − Σ_j c_j z_j rebuilds the adapter exactly (runtime/seedpool.py)
    start.safetensors           tensors set before ZO began (the linear-probe head), if any: a few KB

numpy + safetensors only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.fsio import write_bytes_atomic, write_json_atomic
from zoedge.manifest import Manifest, sha256_file
from zoedge.patchdoc import (  # noqa: F401 - the file names are re-exported for the trainer and scripts
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, COEFFICIENTS_FILE, PATCH_FILE, PATCH_FILES, PATCH_FORMAT, START_FILE,
    TRAJECTORY_FILE, PatchDoc,
)
from zoedge.runtime import seedpool
from zoedge.runtime.tensors import load_tensors, safetensors_bytes, save_tensors, tensor_digest
from zoedge.runtime.zo import OPTIMIZERS, ZOConfig, replay
from zoedge.transfer import read_patch_doc


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
                start: dict[str, np.ndarray], meta: dict[str, Any], coefficients: np.ndarray | None = None) -> PatchDoc:
    """Write every file to temporaries, then rename into place; patch.json last (it marks the patch complete).
    meta: the PatchDoc fields of the run (steps, steps_run, run_seed, zo, examples, metrics, ...); the bundle's
    fields (ids, hashes, labels, trainables) come from the manifest. An unknown meta key is a TypeError.
    A seed-pool patch (meta seed_pool_id / seed_pool_k) gives its coefficients instead of a trajectory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PATCH_FILE).unlink(missing_ok=True)  # an incomplete patch has no patch.json
    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        write_bytes_atomic(out / name, data)
        files[name] = sha256_file(out / name)

    doc = PatchDoc.for_bundle(manifest, tensor_digest(tensors), files, **meta)  # refuses bad meta before writing
    if (coefficients is None) != (doc.seed_pool_k is None) or \
            (coefficients is not None and np.shape(coefficients) != (doc.seed_pool_k,)):
        raise ValueError("a seed-pool patch (seed_pool_k in meta) is written with its K coefficients, others without")
    put(ADAPTER_FILE, safetensors_bytes(tensors))
    if start:
        put(START_FILE, safetensors_bytes(start))
    else:
        (out / START_FILE).unlink(missing_ok=True)
    series, stale = (TRAJECTORY_FILE, COEFFICIENTS_FILE) if coefficients is None else (COEFFICIENTS_FILE, TRAJECTORY_FILE)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(trajectory if coefficients is None else coefficients, dtype="<f4"))
    put(series, buf.getvalue())
    (out / stale).unlink(missing_ok=True)
    cfg = adapter_config(manifest)
    if cfg is not None:
        write_json_atomic(out / ADAPTER_CONFIG_FILE, cfg)
        files[ADAPTER_CONFIG_FILE] = sha256_file(out / ADAPTER_CONFIG_FILE)
    doc.files = files
    doc.write(out)  # last: its presence marks a complete patch
    return doc


def read_patch(patch_dir: str | Path, require_all: bool = True) -> dict[str, Any]:
    """patch.json as a plain dict (validated by PatchDoc, every listed file checked against its sha256)."""
    return read_patch_doc(patch_dir, require_all).to_dict()


def load_patch(patch_dir: str | Path, manifest: Manifest) -> tuple[PatchDoc, dict[str, np.ndarray]]:
    """(patch.json, adapter tensors) of a complete patch, checked to fit the bundle of `manifest`."""
    from zoedge.runtime.bundle import check_trainables

    doc = read_patch_doc(patch_dir)
    doc.check_fits(manifest, str(patch_dir))
    where = str(Path(patch_dir) / ADAPTER_FILE)
    return doc, check_trainables(manifest, load_tensors(Path(patch_dir) / ADAPTER_FILE), where)


def load_patch_tensors(patch_dir: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    return load_patch(patch_dir, manifest)[1]


def check_replay_inputs(patch_dir: Path, doc: PatchDoc) -> None:
    """What replay reads beyond PatchDoc's own checks (run_seed and zo present, a known optimizer, a numeric
    trajectory.npy), so a malformed (or hostile) patch is a one-line ZoedgeError (CLI) / 400 (server) rather
    than a KeyError / TypeError deep inside replay."""
    if doc.run_seed is None:
        raise ZoedgeError(f"{PATCH_FILE}: 'run_seed' must be a non-negative integer (got None)")
    if doc.zo is None:
        raise ZoedgeError(f"{PATCH_FILE}: 'zo' (the ZO configuration needed for replay) must be an object")
    if doc.zo.get("optimizer", "zo-sgd") not in OPTIMIZERS:
        raise ZoedgeError(f"{PATCH_FILE}: zo.optimizer {doc.zo.get('optimizer')!r:.40} is not one of "
                          f"{', '.join(OPTIMIZERS)}")
    traj = patch_dir / TRAJECTORY_FILE
    if traj.is_file() and doc.seed_pool_k is None:
        try:
            a = np.load(traj, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise ZoedgeError(f"{patch_dir}: unreadable {TRAJECTORY_FILE} ({str(e)[:120]})") from None
        if a.dtype.kind not in "fiu":
            raise ZoedgeError(f"{patch_dir}: {TRAJECTORY_FILE} holds {a.dtype} values, expected float32 numbers")


def replay_patch(patch_dir: str | Path, bundle_dir: str | Path, check_bundle_files: bool = True) -> dict[str, np.ndarray]:
    """Rebuild the trained tensors from the bundle's initial tensors and the patch's trajectory (numpy only).
    Needs only patch.json, trajectory.npy and start.safetensors (if listed) from the patch; a seed-pool patch
    is rebuilt from its coefficients.npy instead (θ0 − Σ_j c_j z_j, runtime/seedpool.py)."""
    from zoedge.runtime.bundle import Bundle, check_trainables

    bundle = Bundle.open(bundle_dir, check_files=check_bundle_files)
    m = bundle.manifest
    doc = read_patch_doc(patch_dir, require_all=False)
    doc.check_fits(m, str(patch_dir))
    check_replay_inputs(Path(patch_dir), doc)
    if doc.seed_pool_k is not None:
        seedpool.check_pool(doc, m, where=str(Path(patch_dir) / PATCH_FILE))
    series = TRAJECTORY_FILE if doc.seed_pool_k is None else COEFFICIENTS_FILE
    for needed in (series, *([START_FILE] if START_FILE in doc.files else [])):
        if not (Path(patch_dir) / needed).is_file():
            raise ZoedgeError(f"{patch_dir}: {needed} is missing; cannot replay")
    tensors = bundle.initial_trainables()
    start_path = Path(patch_dir) / START_FILE
    if start_path.is_file():
        for k, v in load_tensors(start_path).items():
            if k not in tensors or tensors[k].shape != v.shape:
                raise ZoedgeError(f"{start_path}: tensor {k!r} does not fit the bundle")
            tensors[k] = np.ascontiguousarray(v, dtype=np.float32).copy()
    cfg = ZOConfig(**{k: v for k, v in doc.zo.items() if k in ZOConfig.__dataclass_fields__})
    roles = {t.name: t.role for t in m.trainables}
    if doc.seed_pool_k is not None:
        c = seedpool.load_coefficients(patch_dir, doc.seed_pool_k)
        seedpool.rebuild(cfg.select(tensors, roles), doc.seed_pool_id, c)
        return check_trainables(m, tensors, "rebuilt tensors")
    try:
        traj = np.load(Path(patch_dir) / TRAJECTORY_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ZoedgeError(f"{patch_dir}: unreadable {TRAJECTORY_FILE} ({e})") from None
    if traj.ndim != 2 or traj.shape[1] != cfg.perturbations + 1:
        raise ZoedgeError(f"{patch_dir}: trajectory has shape {traj.shape}, expected (steps, {cfg.perturbations + 1})")
    if traj.shape[0] != doc.steps:
        raise ZoedgeError(f"{patch_dir}: trajectory has {traj.shape[0]} steps, {PATCH_FILE} says {doc.steps}")
    replay(cfg.select(tensors, roles), cfg, roles, doc.run_seed, traj)
    return check_trainables(m, tensors, "replayed tensors")


def complete_patch_dir(patch_dir: str | Path, bundle_dir: str | Path) -> PatchDoc:
    """Rebuild adapter_model.safetensors (+ adapter_config.json) of a trajectory or seed-pool patch in place by
    replaying it against the bundle; the result is byte-identical to the trainer's and passes `read_patch`."""
    patch_dir, bundle_dir = Path(patch_dir), Path(bundle_dir)
    doc = PatchDoc.load(patch_dir)
    if doc.kind == "global" and doc.seed_pool_k is None:
        raise ZoedgeError(f"{patch_dir}: a global (aggregated) patch has no trajectory to replay; "
                          f"use its {ADAPTER_FILE}")
    tensors = replay_patch(patch_dir, bundle_dir)
    if tensor_digest(tensors) != doc.adapter_sha256:
        series = TRAJECTORY_FILE if doc.seed_pool_k is None else COEFFICIENTS_FILE
        raise ZoedgeError(f"replaying {series} does not give the tensors of adapter_sha256 in {PATCH_FILE}")
    save_tensors(tensors, patch_dir / ADAPTER_FILE, metadata={"format": "pt"})  # as write_patch does
    config = adapter_config(Manifest.load(bundle_dir))
    if ADAPTER_CONFIG_FILE in doc.files and config is not None:
        write_json_atomic(patch_dir / ADAPTER_CONFIG_FILE, config)
    return read_patch_doc(patch_dir)  # every listed file now present and matching
