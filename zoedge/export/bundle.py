"""`zoedge export`: source model -> bundle directory.

Every option is validated before anything is loaded or written; the bundle is built in a temporary
sibling directory and moved into place only when complete, so a failed export never leaves a partial
bundle nor touches an existing one.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import zoedge
from zoedge.errors import ZoedgeError
from zoedge.fsio import mkdtemp_in
from zoedge.manifest import (
    FORMATS, MODEL_FILE, QUANT_MODES, TARGETS, TOKENIZER_FILE, TRAINABLE_FILE, Lineage, Manifest, sha256_file,
)
from zoedge.runtime.tensors import save_tensors, tensor_digest

DEFAULT_LABELS = ["negative", "positive"]
DEFAULT_LABEL_WORDS = [" terrible", " great"]
# Per-target defaults: quantization and execution-provider plan.
TARGET_QUANT = {"cpu": "fp32", "pi": "int8", "phone": "int8", "jetson": "fp16"}
# Modules kept in float by default when quantizing, per architecture and mode (--quant-exclude overrides).
# Llama MLP down-projections carry activation outliers: SmolLM2-135M int8 per-channel scored 67.7% on SST-2
# test (fp32 78.4%); keeping down_proj in float gives 78.2% for 311 MB instead of 232 MB (docs/quantization.md).
CALIBRATED = ("int8-static", "int8-smooth")  # modes that read calibration text
# int8-smooth keeps a llama's first 5 decoder layers as fp32 MatMuls: on SmolLM2 they carried most of the int8 error
# (agreement with fp32 on 872 SST-2 sentences: all layers int8 97.1%, layers 0-4 in float 98.3% at 1.97x fp32's
# forward; other 5-layer blocks in float 97.0-97.6%; docs/quantization.md, issue 18).
FIRST_LAYERS_FLOAT = r"layers\.[0-4]\."
DEFAULT_QUANT_EXCLUDE = {("llama", "int8-dynamic"): "down_proj", ("llama", "int8-smooth"): FIRST_LAYERS_FLOAT}
CALIBRATION_SAMPLE = 128


@dataclass
class ExportOptions:
    model: str
    out: Path
    task: str = "classify"
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    label_words: list[str] | None = None
    prompt: str | None = None
    trainable: str = "lora,head"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    quant: str | None = None
    calibration: Path | None = None
    target: str = "cpu"
    max_length: int = 64
    force: bool = False
    seed: int = 0
    copies: int = 0
    format: str = "onnx"  # onnx | ort | tflite
    quant_exclude: str | None = None  # regex over source module paths kept in float (e.g. down_proj)


JETSON_BATCH = (1, 16, 64)  # TensorRT shape profile: min / opt / max rows per forward


def providers_for(target: str, max_length: int) -> list[dict]:
    """Execution-provider plan; Jetson: TensorRT (fp16, persistent engine cache, fixed shape profile) > CUDA > CPU."""
    if target == "jetson":
        def shapes(rows: int, seq: int) -> str:
            return f"input_ids:{rows}x{seq},attention_mask:{rows}x{seq}"

        lo, opt, hi = JETSON_BATCH
        return [
            {"name": "TensorrtExecutionProvider",
             "options": {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "trt_cache",
                         "trt_timing_cache_enable": True, "trt_profile_min_shapes": shapes(lo, 3),
                         "trt_profile_opt_shapes": shapes(opt, max_length),
                         "trt_profile_max_shapes": shapes(hi, max_length)}},
            {"name": "CUDAExecutionProvider", "options": {}},
            {"name": "CPUExecutionProvider", "options": {}},
        ]
    return [{"name": "CPUExecutionProvider", "options": {}}]


def validate(opts: ExportOptions) -> None:
    """Checks that need no model loaded; raise ZoedgeError with one line."""
    from zoedge.export.trainables import parse_kinds

    if opts.task not in ("classify", "lm"):
        raise ZoedgeError(f"bad --task {opts.task!r}: choose classify or lm")
    if opts.target not in TARGETS:
        raise ZoedgeError(f"bad --target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    if opts.quant is not None and opts.quant not in QUANT_MODES:
        raise ZoedgeError(f"bad --quant {opts.quant!r}: choose one of {', '.join(QUANT_MODES)}")
    kinds = parse_kinds(opts.trainable)
    if opts.task == "lm" and "head" in kinds:
        raise ZoedgeError("bad --trainable: an lm task has no head; use lora, bias or full")
    if opts.task == "classify" and len(opts.labels) < 2:
        raise ZoedgeError("bad --labels: give at least two labels")
    if opts.label_words is not None and len(opts.label_words) != len(opts.labels):
        raise ZoedgeError(f"bad --label-words: {len(opts.label_words)} words for {len(opts.labels)} labels")
    if opts.prompt is not None and "{sentence}" not in opts.prompt:
        raise ZoedgeError("bad --prompt: the template must contain {sentence}")
    if opts.quant_exclude is not None:
        try:
            re.compile(opts.quant_exclude)
        except re.error as e:
            raise ZoedgeError(f"bad --quant-exclude {opts.quant_exclude!r}: {e}") from None
    if opts.format not in FORMATS:
        raise ZoedgeError(f"bad --format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if opts.format == "tflite" and opts.quant not in (None, "fp32", "int8"):
        raise ZoedgeError("bad --quant for --format tflite: fp32 or int8 (the converter's dynamic-range int8)")
    if opts.format == "tflite" and opts.copies:
        raise ZoedgeError("bad --copies: not supported with --format tflite")
    if opts.copies and (opts.copies < 2 or opts.copies % 2):
        raise ZoedgeError(f"bad --copies {opts.copies}: an even number >= 2 (two per perturbation)")
    if opts.copies:
        from zoedge.export.copies import COPY_KINDS

        if not set(kinds) <= COPY_KINDS:
            raise ZoedgeError("bad --copies: supports --trainable lora and head only")
    if not 2 <= opts.max_length <= 4096:
        raise ZoedgeError(f"bad --max-length {opts.max_length}: must be between 2 and 4096")
    if opts.calibration is not None and not Path(opts.calibration).is_file():
        raise ZoedgeError(f"--calibration {opts.calibration}: no such file")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ZoedgeError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise ZoedgeError(f"--out {out}: directory is not empty (use --force to replace it)")


def export_bundle(opts: ExportOptions, log=print) -> Manifest:
    validate(opts)
    import torch

    from zoedge.export.assemble import build_selection
    from zoedge.export.onnx_graph import TrainablesAsInputs, export_onnx
    from zoedge.export.quantize import QUANTIZED_EMBEDDINGS, quantize, resolve_mode
    from zoedge.export.trainables import parse_kinds
    from zoedge.models.registry import load_source

    kinds = parse_kinds(opts.trainable)
    log(f"loading {opts.model} ...")
    src = load_source(opts.model)
    quant = opts.quant or TARGET_QUANT[opts.target]
    scheme = resolve_mode(quant, src.architecture)
    quant_exclude = opts.quant_exclude
    if quant_exclude is None:
        quant_exclude = DEFAULT_QUANT_EXCLUDE.get((src.architecture, scheme))
    if quant == "int4" and src.kind != "decoder":
        raise ZoedgeError(f"--quant int4 (MatMulNBits) is for decoder models; {opts.model} is an {src.kind}")
    if opts.task == "lm" and src.kind != "decoder":
        raise ZoedgeError(f"--task lm needs a decoder model; {opts.model} is an {src.kind}")

    max_seq = int(getattr(src.model.config, "max_position_embeddings", 4096) or 4096)
    if opts.max_length > max_seq:
        raise ZoedgeError(f"bad --max-length {opts.max_length}: {opts.model} supports at most {max_seq} tokens")
    torch.manual_seed(opts.seed)
    label_words, label_ids, prompt = [], [], ""
    truncation_side = "right"
    if src.kind == "decoder" and opts.task == "classify":
        label_words = opts.label_words or src.defaults.get("label_words") or DEFAULT_LABEL_WORDS
        prompt = opts.prompt or src.defaults.get("prompt") or "{sentence} It was"
        for w in label_words:
            ids = src.tokenizer(w, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ZoedgeError(f"bad --label-words: {w!r} tokenises to nothing")
            label_ids.append(int(ids[0]))
        if len(set(label_ids)) != len(label_ids):
            raise ZoedgeError("bad --label-words: two label words start with the same token")
        truncation_side = "left"  # keep the prompt's end, where the label word is predicted
    candidates = [prompt, *prompt_candidates(src.tokenizer, label_words)] if prompt and not opts.prompt else []
    candidates = list(dict.fromkeys(candidates))
    sel = build_selection(src, opts.task, len(opts.labels), label_ids, kinds, opts.lora_rank, opts.lora_alpha,
                          opts.lora_targets)

    initial = {t.name: dict(sel.module.named_parameters())[sel.param_names[t.name]].detach().float().clone()
               for t in sel.trainables}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_in(out.parent, out.name)  # ordinary permissions once renamed into place
    try:
        if opts.copies:
            from zoedge.export.copies import enable_copies

            enable_copies(sel.module, list(sel.param_names.values()), kinds)
        wrapper = TrainablesAsInputs(sel.module, sel.param_names).eval()
        n_values = sum(int(np.prod(t.shape)) for t in sel.trainables)
        details: dict = {}
        model_file, signature = MODEL_FILE, {}
        if opts.format == "tflite":
            from zoedge.export.tflite import convert_to_tflite

            log(f"converting to TFLite with litert-torch ({len(sel.trainables)} trainable tensors, {n_values:,} values) ...")
            model_file = TFLITE_FILE
            inputs, outputs, signature, details = convert_to_tflite(
                wrapper, opts.task, initial, tmp / TFLITE_FILE, quantize=(quant == "int8"), num_labels=len(opts.labels),
                hidden=src.model.config.hidden_size, max_length=opts.max_length)
        else:
            log(f"exporting ONNX ({len(sel.trainables)} trainable tensors, {n_values:,} values) ...")
            fp32_path = tmp / "model.fp32.onnx"
            inputs, outputs = export_onnx(wrapper, opts.task, initial, fp32_path, len(opts.labels),
                                          src.model.config.hidden_size, max_seq, opts.copies)
            if quant == "fp32":
                fp32_path.rename(tmp / MODEL_FILE)
            else:
                log(f"quantizing ({quant}) ...")
                feeds = _calibration_feeds(opts, src, prompt, truncation_side, initial) if scheme in CALIBRATED else None
                details = quantize(fp32_path, tmp / MODEL_FILE, scheme, list(initial), feeds, quant_exclude,
                                   embedding=src.architecture in QUANTIZED_EMBEDDINGS)
                details["scheme"] = scheme
                if feeds is not None:
                    details["calibration_source"] = str(opts.calibration) if opts.calibration else "builtin"
                fp32_path.unlink()
            if opts.format == "ort":
                model_file = ORT_FILE
                to_ort_format(tmp / MODEL_FILE, tmp / ORT_FILE)
                (tmp / MODEL_FILE).unlink()
        arrays = {k: v.numpy() for k, v in initial.items()}
        save_tensors(arrays, tmp / TRAINABLE_FILE)
        _save_tokenizer(src.tokenizer, tmp / TOKENIZER_FILE)
        manifest = Manifest(
            model_id=src.model_id, architecture=src.architecture, kind=src.kind, task=opts.task,
            max_length=opts.max_length, inputs=inputs, outputs=outputs, trainables=sel.trainables,
            trainable_kinds=kinds, base_sha256=src.base_sha256, initial_sha256=tensor_digest(arrays),
            model_source=src.source, num_parameters=sum(p.numel() for p in src.model.parameters()),
            labels=list(opts.labels) if opts.task == "classify" else [],
            label_words=list(label_words), label_token_ids=label_ids, prompt_template=prompt,
            prompt_candidates=candidates,
            truncation_side=truncation_side, lora=sel.lora, copies=opts.copies, model_format=opts.format,
            model_file=model_file, signature=signature, quantization=quant, quantization_details=details,
            target=opts.target, providers=providers_for(opts.target, opts.max_length),
            zoedge_version=zoedge.__version__, bundle_id=uuid.uuid4().hex,
            lineage=Lineage.derive(src.model_id, src.base_sha256, sel.trainables, src.revision),
        )
        manifest.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest.save(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


ORT_FILE = "model.ort"
TFLITE_FILE = "model.tflite"


def to_ort_format(src: Path, dst: Path) -> None:
    """ORT flatbuffer format for ORT Mobile (what onnxruntime.tools.convert_onnx_models_to_ort writes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise ZoedgeError("ORT format conversion wrote no file")


def _save_tokenizer(tokenizer, path: Path) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ZoedgeError("the model's tokenizer has no fast (tokenizers) backend; cannot write tokenizer.json")
    backend.save(str(path))


def _calibration_feeds(opts: ExportOptions, src, prompt: str, truncation_side: str, initial) -> list[dict]:
    from zoedge.runtime.data import read_examples

    if opts.calibration is not None:
        texts = read_examples(opts.calibration, need_labels=False).texts[:CALIBRATION_SAMPLE]
    else:
        texts = BUILTIN_CALIBRATION
    tok = src.tokenizer
    tok.truncation_side = truncation_side
    trainables = {k: v.numpy() for k, v in initial.items()}
    feeds = []
    for i in range(0, len(texts), 16):
        batch = [prompt.replace("{sentence}", t) if prompt else t for t in texts[i:i + 16]]
        enc = tok(batch, padding=True, truncation=True, max_length=opts.max_length, return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                      "attention_mask": enc["attention_mask"].astype(np.int64), **trainables})
    return feeds


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished bundle into place; an existing (forced) directory is removed only after that succeeds."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def prompt_candidates(tokenizer, label_words: list[str]) -> list[str]:
    """Other templates a device may pick for its linear-probe head start (by held-out accuracy on its own data):
    a plain continuation, and the model's chat template when it has one (instruct models). On SmolLM2 a
    chat-format prompt scored 54% zero-shot but gave the best probe features (83.0% vs 80.5%; docs/learning.md)."""
    words = " or ".join(w.strip() for w in label_words)
    out = ["{sentence} It was"]
    user = {"role": "user", "content": f"Is the sentiment of this text {words}?\n{{sentence}}"}
    if getattr(tokenizer, "chat_template", None):
        chat = ""
        # An empty system turn first: templates that insert a default system prompt (SmolLM2's is ~20 tokens)
        # would otherwise spend the --max-length budget on it; templates without a system role get none.
        for messages in ([{"role": "system", "content": ""}, user], [user]):
            try:
                chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                break
            except Exception:  # noqa: BLE001 - a template that refuses these roles
                continue
        if "{sentence}" in chat:
            out.append(chat + "The sentiment is")
    return out


# A few neutral sentences for int8-static calibration when the user gives no --calibration file.
BUILTIN_CALIBRATION = [
    "the film is a charming and often affecting journey .",
    "a dull , lifeless plot that never finds its footing .",
    "the weather today is mild with a light breeze from the west .",
    "please restart the device after the update has finished installing .",
    "an unflinchingly bleak and desperate story , told with great care .",
    "the battery lasts two days and the screen is bright enough outdoors .",
    "i would not recommend this restaurant to anyone who values their time .",
    "the committee will meet on thursday to review the budget proposal .",
    "it 's a funny , touching and smartly written comedy .",
    "the instructions were confusing and the parts did not fit together .",
    "our train was delayed by forty minutes because of a signal failure .",
    "one of the most beautiful things i have seen on screen in years .",
    "the soup was cold , the bread was stale and the waiter was rude .",
    "researchers measured the temperature of the lake every hour for a month .",
    "a masterpiece of quiet observation and precise , unsentimental acting .",
    "nothing in this sequel justifies its two and a half hour running time .",
]
