"""The patch contract: `patch.json` as a typed dataclass, next to the bundle's Manifest (standard library only).

One writer (`PatchDoc.to_dict` / `write`) and one validator (`PatchDoc.from_dict` / `load`): every stage that
writes patch.json (the trainer through runtime.patch.write_patch, the server's aggregation, the tests'
patch factory) builds a PatchDoc, and every reader goes through `from_dict`, which raises ZoedgeError with
a one-line message. Unknown keys are ignored on load, so newer patches still load; `format` must be
"zoedge-patch/1". Docs written before `labels` / `trainables_sha256` existed still load (both None / "").

`check_fits(manifest)` says whether the patch belongs to a bundle: same base weights, same initial tensors,
same labels and trainable names / shapes; a patch made for another bundle id is accepted only when it records
labels and trainables and they all match (a re-export of the same bundle), never on the base model alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import zoedge
from zoedge.errors import ZoedgeError
from zoedge.fsio import write_json_atomic
from zoedge.manifest import Manifest, read_json

PATCH_FORMAT = "zoedge-patch/1"

# File names inside a patch directory.
PATCH_FILE = "patch.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TRAJECTORY_FILE = "trajectory.npy"
START_FILE = "start.safetensors"
COEFFICIENTS_FILE = "coefficients.npy"  # seed-pool patches: float32 (K,), one coefficient per pool seed
PATCH_FILES = (PATCH_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, TRAJECTORY_FILE, START_FILE, COEFFICIENTS_FILE)

KINDS = ("device", "global")  # a device's training run | an aggregate of device patches (no trajectory)
REQUIRED = ("base_sha256", "adapter_sha256")
COUNTS = ("steps", "examples", "version", "rollbacks", "forward_passes", "optimizer_state_bytes")
ZO_NUMBERS = ("eps", "weight_decay", "momentum", "beta2", "adam_eps", "clip")
MAX_PERTURBATIONS = 4096
MAX_SEED_POOL_K = 1 << 20  # a pool's coefficients: 4 MB at most


def trainables_digest(manifest: Manifest) -> str:
    """sha256 of the bundle's trainable tensors' names and shapes (not their values), in name order."""
    spec = sorted([t.name, list(t.shape)] for t in manifest.trainables)
    return hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _labels(labels: list[str]) -> str:
    return "[" + ", ".join(labels) + "]" if labels else "no labels"


@dataclass
class PatchDoc:
    base_sha256: str  # the source weights the patch was trained on (the bundle's base_sha256)
    adapter_sha256: str  # tensor digest of adapter_model.safetensors (runtime.tensors.tensor_digest)
    files: dict[str, str]  # file name -> sha256 of every file written with the patch (patch.json excluded)
    format: str = PATCH_FORMAT
    bundle_id: str = ""
    model_id: str = ""
    initial_sha256: str = ""  # the bundle's initial trainables (replay starts from them)
    labels: list[str] | None = None  # the bundle's labels (None: an older patch that did not record them)
    trainables_sha256: str = ""  # trainables_digest of the bundle ("": not recorded)
    kind: str = "device"  # one of KINDS
    version: int = 0  # global: its version
    parents: list[str] = field(default_factory=list)  # global: the aggregated patch ids
    steps: int = 0  # rows of trajectory.npy (the steps that made the kept tensors)
    steps_run: int | None = None
    run_seed: int | None = None  # needed (with zo) to replay the trajectory
    zo: dict[str, Any] | None = None  # the ZO configuration (runtime.zo.ZOConfig.to_dict())
    seed_pool_id: int | None = None  # seed-pool patch: the pool its directions come from (runtime.seedpool)
    seed_pool_k: int | None = None  # and its size K: coefficients.npy holds K float32 (None: not seed-pool)
    examples: int = 0  # training examples (FedAvg weight)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    rollbacks: int = 0
    forward_passes: int = 0
    optimizer_state_bytes: int = 0
    prompt_template: str | None = None  # a decoder patch is read through this prompt (None: the bundle's)
    prompt_search: list[Any] | None = None  # the candidates the device scored
    # --unlabelled: the label prior estimated on the device's unlabelled texts and the shift it added to the head's
    # bias (already in the tensors; a record, not an instruction): unlabelled, source, estimated, bias_shift, ...;
    # or unlabelled and skipped (why no shift was applied: the model was no better than a constant on --eval)
    label_prior: dict[str, Any] | None = None
    zoedge_version: str = ""
    where: InitVar[str] = PATCH_FILE  # for error messages only; not written

    def __post_init__(self, where: str) -> None:
        problem = self.problem()
        if problem:
            raise ZoedgeError(f"{where}: {problem}")

    def problem(self) -> str | None:  # noqa: C901 - one flat list of field checks
        """The first thing wrong with the fields (None: valid)."""
        if self.format != PATCH_FORMAT:
            return f"unknown patch format {self.format!r:.60} (this zoedge reads {PATCH_FORMAT})"
        if not isinstance(self.files, dict):
            return "no 'files' table"
        for name, digest in self.files.items():
            if name not in PATCH_FILES or name == PATCH_FILE or not isinstance(digest, str):
                return f"'files' lists {name!r:.60}, which is not a patch file with a sha256"
        for name in ("base_sha256", "adapter_sha256", "bundle_id", "model_id", "initial_sha256",
                     "trainables_sha256", "zoedge_version"):
            if not isinstance(getattr(self, name), str):
                return f"{name!r} must be a string (got {getattr(self, name)!r:.60})"
        for name in COUNTS:
            if not _count(getattr(self, name)):
                return f"{name!r} must be a non-negative integer (got {getattr(self, name)!r:.60})"
        for name in ("steps_run", "run_seed"):
            v = getattr(self, name)
            if v is not None and not _count(v):
                return f"{name!r} must be a non-negative integer (got {v!r:.60})"
        if self.kind not in KINDS:
            return f"'kind' must be one of {', '.join(KINDS)} (got {self.kind!r:.60})"
        if self.labels is not None and not _strings(self.labels):
            return "'labels' must be a list of strings"
        if not _strings(self.parents):
            return "'parents' must be a list of patch ids"
        for name in ("metrics", "hyperparameters"):
            if not isinstance(getattr(self, name), dict):
                return f"{name!r} must be an object"
        if self.seconds is not None and not (_number(self.seconds) and self.seconds >= 0):
            return f"'seconds' must be a non-negative number (got {self.seconds!r:.60})"
        if self.prompt_template is not None and not (isinstance(self.prompt_template, str)
                                                     and "{sentence}" in self.prompt_template):
            return "prompt_template must be a string containing {sentence}"
        if self.prompt_search is not None and not isinstance(self.prompt_search, list):
            return "'prompt_search' must be a list"
        return self._zo_problem() or self._seed_pool_problem() or self._prior_problem()

    def _zo_problem(self) -> str | None:
        zo = self.zo
        if zo is None:
            return None
        if not isinstance(zo, dict):
            return "'zo' (the ZO configuration needed for replay) must be an object"
        if not isinstance(zo.get("optimizer", "zo-sgd"), str):
            return "zo.optimizer must be a string"
        q = zo.get("perturbations", 1)
        if not (_count(q) and 1 <= q <= MAX_PERTURBATIONS):
            return f"zo.perturbations must be an integer from 1 to {MAX_PERTURBATIONS} (got {q!r:.60})"
        for key in ZO_NUMBERS:
            if key in zo and not _number(zo[key]):
                return f"zo.{key} must be a finite number (got {zo[key]!r:.60})"
        if "inplace" in zo and not isinstance(zo["inplace"], bool):
            return "zo.inplace must be true or false"
        if zo.get("roles") is not None and not _strings(zo["roles"]):
            return "zo.roles must be a list of role names or null"
        if "generator" in zo and not isinstance(zo["generator"], str):
            return "zo.generator must be a string"
        return None

    def _seed_pool_problem(self) -> str | None:
        if self.seed_pool_id is None and self.seed_pool_k is None:
            return None
        if not (_count(self.seed_pool_id) and _count(self.seed_pool_k) and 1 <= self.seed_pool_k <= MAX_SEED_POOL_K):
            return (f"seed_pool_id must be a non-negative integer and seed_pool_k one from 1 to {MAX_SEED_POOL_K} "
                    f"(got {self.seed_pool_id!r:.30}, {self.seed_pool_k!r:.30})")
        zo = self.zo or {}
        if zo.get("optimizer", "zo-sgd") != "zo-sgd" or zo.get("weight_decay", 0) or not zo.get("inplace", True):
            return "a seed-pool patch must come from zo-sgd without weight decay, perturbing in place"
        return None

    def _prior_problem(self) -> str | None:
        lp = self.label_prior
        if lp is None:
            return None
        want = len(self.labels) if self.labels is not None else None

        def per_label(v: Any) -> bool:
            return isinstance(v, list) and all(_number(x) for x in v) and (want is None or len(v) == want)

        if isinstance(lp, dict) and _count(lp.get("unlabelled")) and "skipped" in lp:  # checked, not applied
            return None if isinstance(lp["skipped"], str) else "'label_prior.skipped' must be a reason (a string)"
        if not (isinstance(lp, dict) and _count(lp.get("unlabelled"))
                and all(per_label(lp.get(k)) for k in ("source", "estimated", "bias_shift"))):
            return ("'label_prior' must be an object with 'unlabelled' (a count) and 'source', 'estimated', "
                    "'bias_shift' (one number per label), or 'skipped' (the reason no shift was applied)")
        return None

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def for_bundle(cls, manifest: Manifest, adapter_sha256: str, files: dict[str, str], **meta: Any) -> "PatchDoc":
        """A new doc for tensors trained on `manifest`'s bundle; meta: the run's fields (steps, zo, ...)."""
        unknown = sorted(set(meta) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"patch.json has no field {unknown[0]!r} (add it to zoedge.patchdoc.PatchDoc)")
        return cls(base_sha256=manifest.base_sha256, adapter_sha256=adapter_sha256, files=dict(files),
                   bundle_id=manifest.bundle_id, model_id=manifest.model_id, initial_sha256=manifest.initial_sha256,
                   labels=list(manifest.labels), trainables_sha256=trainables_digest(manifest),
                   zoedge_version=zoedge.__version__, **meta)

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What patch.json holds; optional fields that are None are left out (as older writers did)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def write(self, patch_dir: str | Path) -> None:
        write_json_atomic(Path(patch_dir) / PATCH_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = PATCH_FILE) -> "PatchDoc":
        if not isinstance(d, dict):
            raise ZoedgeError(f"{where}: not a JSON object")
        if d.get("format") != PATCH_FORMAT:
            raise ZoedgeError(f"{where}: unknown patch format {d.get('format')!r:.60} (this zoedge reads {PATCH_FORMAT})")
        if not isinstance(d.get("files"), dict):
            raise ZoedgeError(f"{where}: no 'files' table")
        for name in REQUIRED:
            if name not in d:
                raise ZoedgeError(f"{where}: {name!r} is missing")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, where=where)

    @classmethod
    def load(cls, patch_dir: str | Path, where: str | None = None) -> "PatchDoc":
        """patch.json of patch_dir, validated; no file hashes checked (zoedge.transfer.read_patch_doc does)."""
        p = Path(patch_dir) / PATCH_FILE
        data = read_json(p, f"{patch_dir}: not a zoedge patch (no {PATCH_FILE})", where)
        return cls.from_dict(data, where or str(p))

    # ---- does it belong to this bundle? ---------------------------------------------------------------
    def check_fits(self, manifest: Manifest, where: str = PATCH_FILE) -> None:
        m = manifest
        if self.base_sha256 != m.base_sha256:
            raise ZoedgeError(f"{where}: patch was made for another base model ({self.model_id:.80}, base "
                              f"{self.base_sha256[:12]}), bundle has {m.model_id} base {m.base_sha256[:12]}")
        if self.initial_sha256 and self.initial_sha256 != m.initial_sha256:
            raise ZoedgeError(f"{where}: patch starts from other initial trainables than this bundle's")
        if self.labels is not None and self.labels != list(m.labels):
            raise ZoedgeError(f"{where}: patch was trained for labels {_labels(self.labels):.200} but this bundle "
                              f"classifies {_labels(m.labels):.200} (bundle {self.bundle_id[:12] or '?'} vs "
                              f"{m.bundle_id[:12] or '?'})")
        if self.trainables_sha256 and self.trainables_sha256 != trainables_digest(m):
            raise ZoedgeError(f"{where}: patch trains other tensors (names or shapes) than this bundle's trainables")
        if (self.bundle_id and m.bundle_id and self.bundle_id != m.bundle_id
                and (self.labels is None or not self.trainables_sha256)):
            raise ZoedgeError(f"{where}: patch was made for bundle {self.bundle_id[:12]}, not {m.bundle_id[:12]}, "
                              "and records no labels or trainables to show it fits this one")
