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

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text through the current template, truncated, unpadded."""
        return [e.ids for e in self.tok.encode_batch([self.format(t) for t in texts])]

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(MIN_WIDTH, max(len(r) for r in rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return ids, mask

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.token_ids(texts))
