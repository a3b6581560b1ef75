"""A patch as a runnable PyTorch / Hugging Face model (workstation side: torch, transformers, peft).

A patch's `adapter_model.safetensors` holds PEFT keys of zoedge's *task module*, not of a stock
`AutoModelForSequenceClassification`: the encoder is `AutoModel` (`encoder.…`), its states are mean-pooled over the
attention mask, and a `Linear(hidden, labels)` named `classifier` reads them (zoedge.export.heads.EncoderClassifier);
a decoder's head is `label_head` over the last real token's state, read through the prompt the patch chose
(DecoderClassifier). `PeftModel.from_pretrained(AutoModelForSequenceClassification…)` therefore loads none of the
LoRA keys (peft only warns). Load it onto the same task module instead:

    from zoedge.export.hf_model import PatchedClassifier
    clf = PatchedClassifier.from_patch("bundle", "patch")      # peft.PeftModel over EncoderClassifier(AutoModel)
    clf.predict(["a wonderful film"])                          # -> ["positive"]
    clf.logits(["a wonderful film"])                           # equal to the fp32 bundle's logits (to ~1e-5)
    clf.model                                                  # the torch module (PeftModel when the patch has LoRA)
    clf.merged()                                               # LoRA folded into the weights (peft merge_and_unload)

or by hand: `module = EncoderClassifier(AutoModel.from_pretrained(dir), len(labels));
peft.PeftModel.from_pretrained(module, "patch")` (the patch's adapter_config.json names the LoRA targets and keeps
`classifier` as a module to save). Texts are tokenised by the bundle's own tokenizer.json, so the token ids are the
device's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.patchdoc import ADAPTER_CONFIG_FILE
from zoedge.runtime.patch import load_patch
from zoedge.runtime.text import TextEncoder

PEFT_PREFIX = "base_model.model."


@dataclass
class PatchedClassifier:
    model: Any  # torch module: peft.PeftModel over the task module, or the task module itself (no LoRA)
    manifest: Manifest
    encoder: TextEncoder  # the bundle's tokenizer, through the patch's prompt template

    @classmethod
    def from_patch(cls, bundle_dir: str | Path, patch_dir: str | Path, source: str | None = None) -> "PatchedClassifier":
        """The source model of the bundle (its registry name or `source`: a HF model directory or .gguf file) with
        the patch's tensors; refused unless the patch fits the bundle and the source weights are the bundle's."""
        import torch

        from zoedge.export.heads import DecoderClassifier, EncoderClassifier
        from zoedge.models.registry import load_source

        m = Manifest.load(bundle_dir)
        if m.task != "classify":
            raise ZoedgeError(f"{bundle_dir}: PatchedClassifier is for classify bundles (this one is {m.task})")
        doc, tensors = load_patch(patch_dir, m)
        src = load_source(source or m.model_id)
        if src.base_sha256 != m.base_sha256:
            raise ZoedgeError(f"{source or m.model_id}: not the weights the bundle was exported from (base "
                              f"{src.base_sha256[:12]}, bundle {m.base_sha256[:12]})")
        if src.kind == "encoder":
            module = EncoderClassifier(src.model, len(m.labels))
        else:
            module = DecoderClassifier(src.model, m.label_token_ids)
        if m.lora is not None and (Path(patch_dir) / ADAPTER_CONFIG_FILE).is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(module, str(patch_dir))
            _check_loaded(model, tensors)
        else:  # head / bias / full patches: plain tensors of the task module
            state = {k[len(PEFT_PREFIX):]: torch.from_numpy(v) for k, v in tensors.items()}
            missing = set(state) - set(dict(module.named_parameters()))
            if missing:
                raise ZoedgeError(f"{patch_dir}: tensor {sorted(missing)[0]!r} is not a parameter of the task module")
            module.load_state_dict(state, strict=False)
            model = module
        encoder = TextEncoder(bundle_dir, m)
        if doc.prompt_template:
            encoder.template = doc.prompt_template
        return cls(model.eval(), m, encoder)

    def logits(self, texts: list[str], batch: int = 32) -> np.ndarray:
        import torch

        parts = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                ids, mask = self.encoder(texts[i:i + batch])
                out = self.model(torch.from_numpy(ids), torch.from_numpy(mask))
                parts.append((out[0] if isinstance(out, tuple) else out).numpy())
        return np.concatenate(parts)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.manifest.labels[i] for i in self.logits(texts).argmax(1)]

    def merged(self) -> Any:
        """The task module with LoRA folded into its weights (no peft at inference)."""
        return self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model


def _check_loaded(model, tensors: dict[str, np.ndarray]) -> None:
    """Every patch tensor must have landed in the model (peft only warns about keys it could not place)."""
    from peft import get_peft_model_state_dict

    got = get_peft_model_state_dict(model, save_embedding_layers=False)
    for k, v in tensors.items():
        if k not in got or not np.array_equal(got[k].detach().cpu().numpy(), v):
            raise ZoedgeError(f"peft did not load patch tensor {k!r} into the task module")
