"""Tokenisation on the device from the bundle's tokenizer.json (the `tokenizers` library; no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from zoedge.errors import ZoedgeError
from zoedge.manifest import TOKENIZER_FILE, Manifest


MIN_WIDTH = 3  # exported graphs accept sequences of at least 3 tokens (padding is masked out)


class TextEncoder:
    """Turns example texts into (input_ids, attention_mask) int64 arrays, right-padded to the longest row."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest):
        path = Path(bundle_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise ZoedgeError(f"{bundle_dir}: missing {TOKENIZER_FILE}")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ZoedgeError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0][:120]})") from None
        self.tok.no_padding()
        self.tok.enable_truncation(manifest.max_length, direction=manifest.truncation_side)
        self.template = manifest.prompt_template or "{sentence}"
        self.pad_id = 0

    def format(self, text: str) -> str:
        return self.template.replace("{sentence}", text)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tok.encode_batch([self.format(t) for t in texts])
        width = max(MIN_WIDTH, max(len(e.ids) for e in encs))
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
        return ids, mask
