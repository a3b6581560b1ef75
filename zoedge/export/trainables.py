"""Choose which tensors of the task module are trainable (and so become ONNX graph inputs).

LoRA is injected with peft, so each trainable's name is exactly its key in a PEFT adapter file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from zoedge.errors import ZoedgeError
from zoedge.export.heads import head_module_name
from zoedge.manifest import TRAINABLE_KINDS, LoraSpec, Trainable

# Short target names -> module-name suffixes, per architecture.
LORA_TARGETS = {
    "bert": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense",
             "up": "intermediate.dense", "down": r"\d+.output.dense"},
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
LORA_TARGETS["gemma3_text"] = LORA_TARGETS["llama"]  # the same projection names
PEFT_PREFIX = "base_model.model."


@dataclass
class Selection:
    module: nn.Module  # the (possibly peft-wrapped) task module
    param_names: dict[str, str]  # trainable name (PEFT key) -> parameter name in `module`
    trainables: list[Trainable]
    lora: LoraSpec | None


def parse_kinds(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRAINABLE_KINDS]
    if not kinds or bad:
        raise ZoedgeError(f"bad --trainable {spec!r}: choose a comma-separated subset of {', '.join(TRAINABLE_KINDS)}")
    if "full" in kinds and len(kinds) > 1:
        raise ZoedgeError("bad --trainable: 'full' already trains every weight; use it alone")
    return kinds


def lora_target_modules(architecture: str, targets: list[str]) -> list[str]:
    table = LORA_TARGETS.get(architecture, {})
    return [table.get(t, t) for t in targets]


def select(task_module: nn.Module, architecture: str, kinds: list[str], rank: int = 8, alpha: float = 16.0,
           targets: list[str] | None = None) -> Selection:
    head = head_module_name(task_module)
    if "head" in kinds and head is None:
        raise ZoedgeError("bad --trainable: 'head' needs a classify task")
    lora = None
    module = task_module
    if "lora" in kinds:
        from peft import LoraConfig, get_peft_model

        if rank < 1:
            raise ZoedgeError(f"bad --lora-rank {rank}: must be >= 1")
        targets = targets or ["q", "v"]
        target_modules = lora_target_modules(architecture, targets)
        regex = r".*\.(" + "|".join(target_modules) + r")$"
        matched = [n for n, _ in task_module.named_modules() if re.fullmatch(regex, n)]
        if not matched:
            raise ZoedgeError(f"bad --lora-targets {','.join(targets)}: no module of this {architecture} model matches")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=regex,
                            modules_to_save=[head] if "head" in kinds else None)
        module = get_peft_model(task_module, config)
        lora = LoraSpec(rank=rank, alpha=float(alpha), targets=list(targets), target_modules=target_modules)
    for p in module.parameters():
        p.requires_grad_(False)

    param_names: dict[str, str] = {}
    trainables: list[Trainable] = []
    for pname, p in module.named_parameters():
        role = _role(pname, p, kinds, head)
        if role is None:
            continue
        key = peft_key(pname)
        param_names[key] = pname
        trainables.append(Trainable(name=key, shape=list(p.shape), role=role, peft_key=key,
                                    module=key[len(PEFT_PREFIX):].rsplit(".", 1)[0]))
    if not trainables:
        raise ZoedgeError(f"bad --trainable {','.join(kinds)}: selects no tensor of this model")
    return Selection(module.eval(), param_names, trainables, lora)


def _role(pname: str, p: nn.Parameter, kinds: list[str], head: str | None) -> str | None:
    if ".lora_A." in pname:
        return "lora_A" if "lora" in kinds else None
    if ".lora_B." in pname:
        return "lora_B" if "lora" in kinds else None
    if "original_module" in pname:  # peft's frozen copy of a modules_to_save module
        return None
    in_head = head is not None and re.search(rf"(^|\.){head}\.", pname) is not None
    if in_head and ("head" in kinds or "full" in kinds):
        return "head"
    is_norm = "norm" in pname.lower()
    if "full" in kinds:
        return "norm" if is_norm else ("bias" if pname.endswith(".bias") else "weight")
    if "bias" in kinds and not in_head:
        if pname.endswith(".bias"):
            return "bias"
        if is_norm:
            return "norm"
    return None


def peft_key(param_name: str) -> str:
    """The key peft's save_pretrained writes for a parameter (adapter name and wrapper levels removed)."""
    k = param_name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    k = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k)
    return k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k
