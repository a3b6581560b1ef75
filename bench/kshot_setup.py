"""What a k-shot cell runs on: the models and their per-task export settings, the bundle cache, the split files.

Bundles are exported once per (model, task, quantization) with the `zoedge export` CLI into a cache directory
keyed on a hash of the exporter's source (zoedge/export, zoedge/models, zoedge/manifest.py) and the export
arguments, so a change to the exporter re-exports and an unchanged one never does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench import REPO
from zoedge import __version__, datasets
from zoedge.errors import ZoedgeError

RESULTS = bench.RESULTS / "kshot"
WORK = bench.WORK / "kshot"  # bundle cache, split files, patches
MAX_LENGTH = 128  # MeZO's; batches are padded to their longest row, so short SST-2 phrases cost no more

# Decoders classify through label words after a prompt. SST-2 and Drugs.com use the model's default review
# prompt (so the device's prompt search keeps its candidates); BBC gets a topic prompt (which turns the search
# off: an explicit --prompt exports no candidates).
DECODER_TASKS = {
    "sst2": {"label_words": [" negative", " positive"]},
    "drugs": {"label_words": [" negative", " neutral", " positive"]},
    "bbc": {"label_words": [" business", " entertainment", " politics", " sport", " tech"],
            "prompt": "Article: {sentence}\nTopic:"},
}


@dataclass
class ModelSpec:
    name: str
    kind: str  # encoder | decoder
    quant: str = "int8"  # the bundle zero-shot, LP and zoedge run on; backprop reads the fp32 one
    max_length: int = MAX_LENGTH
    extra: list[str] = field(default_factory=list)


MODELS = {
    "minilm": ModelSpec("minilm", "encoder"),
    "smollm2-135m": ModelSpec("smollm2-135m", "decoder"),  # int8 = weight-only MatMulNBits for llama
    "gemma3-270m": ModelSpec("gemma3-270m", "decoder"),  # int8 = weight-only MatMulNBits + int8 embedding table
    "tiny-bert": ModelSpec("tiny-bert", "encoder", max_length=32),  # tests
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ZoedgeError(f"unknown model {name!r} for the k-shot bench: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def export_args(spec: ModelSpec, task: datasets.Task, quant: str) -> list[str]:
    args = [spec.name, "--labels", ",".join(task.labels), "--quant", quant, "--max-length", str(spec.max_length),
            "--trainable", "lora,head", *spec.extra]
    if spec.kind == "decoder":
        d = DECODER_TASKS[task.name]
        args += ["--label-words", ",".join(f'"{w}"' for w in d["label_words"])]
        if "prompt" in d:
            args += ["--prompt", d["prompt"]]
    return args


def exporter_hash() -> str:
    """sha256 over the exporter's source files and the zoedge version: the bundle cache's key."""
    h = hashlib.sha256(__version__.encode())
    pkg = REPO / "zoedge"
    files = sorted([*(pkg / "export").glob("*.py"), *(pkg / "models").glob("*.py"), pkg / "manifest.py"])
    for p in files:
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def bundle_key(args: list[str]) -> str:
    return hashlib.sha256(json.dumps([exporter_hash(), args]).encode()).hexdigest()[:16]


def ensure_bundle(cache: Path, spec: ModelSpec, task: datasets.Task, quant: str, log=print) -> dict:
    """The cached bundle for (model, task, quant), exported first when the key has none; returns path and key."""
    args = export_args(spec, task, quant)
    key = bundle_key(args)
    out = cache / f"{spec.name}-{task.name}-{quant}-{key}"
    if not (out / "manifest.json").is_file():
        log(f"kshot: exporting {' '.join(args)} -> {out}")
        p = subprocess.run([sys.executable, "-m", "zoedge", "export", *args, "--out", str(out), "--force"],
                           capture_output=True, text=True, cwd=REPO)
        if p.returncode:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise ZoedgeError(f"export of {spec.name} for {task.name} ({quant}) failed: {tail[:300]}")
    return {"path": str(out), "key": key, "export_args": args, **bundle_identity(out)}


def bundle_identity(bundle_dir: str | Path) -> dict:
    """What tells two bundles apart whatever their cache key: bundle id, quantization, the model file's sha256."""
    m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    q = m.get("quantization_details") or {}
    return {"bundle_id": m.get("bundle_id"), "quantization": m.get("quantization"),
            "quant_method": q.get("scheme") or q.get("method") if isinstance(q, dict) else None,
            "model_sha256": (m.get("files") or {}).get(m.get("model_file"), "")[:16]}


def split_files(work: Path, task: datasets.Task, k: int, seed: int) -> dict[str, str]:
    """The k-shot split as TSV files (written when missing; they are a pure function of task, k, seed), with the
    unlabelled pool texts the zoedge contender reads through --unlabelled (where the task's pool is like its test)."""
    d = work / "splits" / f"{task.name}-k{k}-s{seed}"
    names = ("train", "val", "test") + (("unlabelled",) if task.pool_like_test else ())
    if not all((d / f"{n}.tsv").is_file() for n in names):
        datasets.write_split(d, datasets.kshot(task, k, seed))
    return {n: str(d / f"{n}.tsv") for n in names if (d / f"{n}.tsv").is_file()}  # a pool used up leaves no unlabelled


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def git_state() -> dict:
    def git(*a: str) -> str:
        p = subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO)
        return p.stdout.strip() if p.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
