"""`zoedge predict`: label and class probabilities for each input text, from a bundle (+ a patch) or a merged
bundle. numpy + onnxruntime + tokenizers only.

Inputs: a TSV / CSV / JSONL file as `runtime.data` reads it (a text column, a label column optional), a plain
text file (one input per line), or standard input (`-`), read line by line: each line is answered as soon as it
arrives, so one sentence piped in costs one forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import OUTPUT_LOGITS
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.data import LABEL_COLUMNS, TEXT_COLUMNS, read_examples
from zoedge.runtime.evaluator import Evaluator
from zoedge.runtime.forward import open_forward
from zoedge.runtime.patch import load_patch

STRUCTURED = (".tsv", ".csv", ".jsonl", ".json")


class Predictor:
    """The bundle's forward with the patch's tensors (or the bundle's own: a merged bundle has none)."""

    def __init__(self, bundle_dir: str | Path, patch: str | Path | None = None, batch: int = 16):
        self.bundle = Bundle.open(bundle_dir)
        m = self.bundle.manifest
        if m.task != "classify":
            raise ZoedgeError(f"{bundle_dir}: a language-model bundle (task lm) has no labels to predict")
        self.untrained = False
        if patch:
            doc, tensors = load_patch(patch, m)  # refused unless trained on this bundle
            if doc.prompt_template:  # a decoder patch is read through the prompt it chose
                self.bundle.encoder.template = doc.prompt_template
        elif m.trainables:
            tensors = self.bundle.initial_trainables()
            self.untrained = True
        else:  # a merged bundle: the trained values are initializers of the graph
            tensors = {}
        self.labels = list(m.labels)
        self.evaluator = Evaluator(self.bundle, open_forward(self.bundle, tensors), batch)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        (logits,) = self.evaluator.outputs(texts, (OUTPUT_LOGITS,))
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def __call__(self, texts: list[str]) -> list[dict]:
        """One {"label", "probabilities"} per text."""
        if not texts:
            return []
        out = []
        for row in self.probabilities(texts):
            out.append({"label": self.labels[int(row.argmax())],
                        "probabilities": {lab: round(float(p), 6) for lab, p in zip(self.labels, row)}})
        return out

    def label_name(self, raw: str) -> str:
        """A label as written in a data file (a name or an index) as the bundle's label name."""
        if raw in self.labels:
            return raw
        if raw.isdigit() and int(raw) < len(self.labels):
            return self.labels[int(raw)]
        return raw


def read_inputs(path: str | Path) -> tuple[list[str], list[str] | None]:
    """(texts, raw labels or None) of a file: TSV / CSV / JSONL with a text column, or plain lines."""
    path = Path(path)
    if not path.is_file():
        raise ZoedgeError(f"{path}: no such data file")
    if path.suffix.lower() in STRUCTURED or _has_header(path):
        ex = read_examples(path, need_labels=False)
        labels = ex.labels if ex.labels is not None and all(ex.labels) else None
        return ex.texts, labels
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ZoedgeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ZoedgeError(f"{path}: no input lines")
    return texts, None


def _has_header(path: Path) -> bool:
    """A plain-named file whose first line is a tab-separated header with a text column (`sentence\\tlabel`)."""
    with open(path, "rb") as f:
        first = f.readline(4096).decode("utf-8", "replace").strip()
    columns = [c.strip() for c in first.split("\t")]
    return len(columns) > 1 and any(c in TEXT_COLUMNS for c in columns) and any(c in LABEL_COLUMNS for c in columns)


def stdin_rows(stream: IO[str] | None = None) -> Iterator[tuple[str, str | None]]:
    """(text, raw label or None) per non-empty line of stdin. Plain lines are texts; a first line that is a
    tab-separated header with a text column (`head dev.tsv | zoedge predict ...`) makes the rest TSV rows."""
    columns: list[str] | None = None
    for i, line in enumerate(stream or sys.stdin):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if i == 0 and "\t" in line:
            header = [c.strip() for c in line.split("\t")]
            if any(c in TEXT_COLUMNS for c in header):
                columns = header
                continue
        if columns is None:
            yield line.strip(), None
            continue
        row = dict(zip(columns, line.split("\t")))
        text = next((row[c] for c in TEXT_COLUMNS if c in row), "").strip()
        label = next((row[c] for c in LABEL_COLUMNS if c in row), None)
        if text:
            yield text, (label.strip() or None) if label is not None else None


def predict_lines(pred: Predictor, texts: list[str], labels: list[str] | None, out: IO[str],
                  batch: int = 64) -> dict:
    """Write one JSON line per text (with "expected" when the file has labels); a summary dict."""
    n = correct = 0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        for j, r in enumerate(pred(chunk)):
            row = {"text": chunk[j], **r}
            if labels is not None:
                row["expected"] = pred.label_name(labels[i + j])
                correct += row["expected"] == r["label"]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        out.flush()
    summary = {"n": n}
    if labels is not None and n:
        summary["accuracy"] = correct / n
    return summary


def predict_stream(pred: Predictor, rows: Iterator[tuple[str, str | None]], out: IO[str]) -> dict:
    """Answer each input line as it arrives (interactive use, or one sentence piped in)."""
    n = correct = labelled = 0
    for text, label in rows:
        (r,) = pred([text])
        row = {"text": text, **r}
        if label is not None:
            row["expected"] = pred.label_name(label)
            labelled += 1
            correct += row["expected"] == r["label"]
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        n += 1
    return {"n": n, **({"accuracy": correct / labelled} if labelled else {})}
