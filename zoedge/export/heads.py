"""The torch modules that become the exported graph: a base model plus the task's head.

Classifiers return (logits, features): features are what the head reads, so a device can fit the head
in closed form (linear probe) from one forward pass per example.

- EncoderClassifier: mean-pooled encoder states -> `classifier` (Linear) -> logits (batch, labels).
- DecoderClassifier: the hidden state at the last real token (right padding) -> `label_head`, a Linear
  initialised from the LM head's rows of the label words -> label-word logits (batch, labels). The
  full-vocabulary logits are never computed.
- DecoderLM: summed next-token NLL and token count per row, so the vocabulary logits stay inside the graph.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        # Deterministic init (independent of the global RNG) so export and verify build the same head.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, 0.02, generator=g)
            self.classifier.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.classifier(pooled), pooled


class DecoderClassifier(nn.Module):
    def __init__(self, lm: nn.Module, label_token_ids: list[int]):
        super().__init__()
        self.lm = lm
        rows = lm.get_output_embeddings().weight.detach()[torch.tensor(label_token_ids)].clone()
        # The label words' LM rows plus a zero bias: the bundle starts at the prompt's zero-shot predictions, and
        # a linear-probe head start on device can fit the class prior (calibration) as well as the direction.
        self.label_head = nn.Linear(rows.shape[1], rows.shape[0], bias=True)
        with torch.no_grad():
            self.label_head.weight.copy_(rows)
            self.label_head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No KV cache: Gemma 3's sliding-window cache layer slices keys by the window and breaks a dynamic-length export.
        h = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1
        features = h[torch.arange(h.shape[0]), last]
        return self.label_head(features), features


class DecoderLM(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        target = input_ids[:, 1:]
        mask = attention_mask[:, 1:].to(logits.dtype)
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * mask).sum(1), mask.sum(1)


def head_module_name(task_module: nn.Module) -> str | None:
    if isinstance(task_module, EncoderClassifier):
        return "classifier"
    if isinstance(task_module, DecoderClassifier):
        return "label_head"
    return None
