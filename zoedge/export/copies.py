"""MP-LoRA copies axis (MobiZO's P-RGE): one forward evaluates several versions of the trainables.

With `--copies C`, every trainable Linear (LoRA A/B, the head) takes a weight of shape (C, out, in)
(and bias (C, out)); the graph's batch is C x B rows, copy-major, and copy c's weights act on rows
[c*B, (c+1)*B). The frozen base runs once over all rows as usual. The runtime puts θ+εz_i and θ-εz_i
into the copies, so q perturbations and both signs cost one batched forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from zoedge.errors import ZoedgeError

COPY_KINDS = {"lora", "head"}


def _copies_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.dim() == 2:  # no copies axis (plain trace, or a frozen Linear)
        return nn.functional.linear(x, w, self.bias)
    copies = w.shape[0]
    y = x.reshape(copies, -1, x.shape[-1]) @ w.transpose(1, 2)
    if self.bias is not None:
        y = y + self.bias.unsqueeze(1)
    return y.reshape(*x.shape[:-1], w.shape[1])


def enable_copies(module: nn.Module, trainable_param_names: list[str], kinds: list[str]) -> None:
    """Make every Linear holding a trainable weight accept per-copy weights (in place)."""
    if not set(kinds) <= COPY_KINDS:
        raise ZoedgeError(f"--copies supports --trainable lora and head only, not {','.join(sorted(set(kinds) - COPY_KINDS))}")
    names = set(trainable_param_names)
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and f"{mod_name}.weight" in names:
            mod.forward = types.MethodType(_copies_linear, mod)
