"""Build the torch task module + trainable selection for a model; shared by export and verify."""

from __future__ import annotations

from zoedge.export.heads import DecoderClassifier, DecoderLM, EncoderClassifier
from zoedge.export.trainables import Selection, select
from zoedge.models.registry import SourceModel


def build_selection(src: SourceModel, task: str, num_labels: int, label_token_ids: list[int], kinds: list[str],
                    lora_rank: int = 8, lora_alpha: float = 16.0, lora_targets: list[str] | None = None) -> Selection:
    if src.kind == "encoder":
        module = EncoderClassifier(src.model, num_labels)
    elif task == "classify":
        module = DecoderClassifier(src.model, label_token_ids)
    else:
        module = DecoderLM(src.model)
    return select(module, src.architecture, kinds, lora_rank, lora_alpha, lora_targets)
