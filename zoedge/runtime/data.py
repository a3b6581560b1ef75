"""Local training data: TSV / CSV / JSONL with a text column and (for classification) a label column.

SST-2's `sentence` / `label` columns work as they are. Stdlib only.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from zoedge.errors import ZoedgeError

TEXT_COLUMNS = ("sentence", "text", "review", "content")
LABEL_COLUMNS = ("label", "labels", "target")
MAX_LINE_CHARS = 100_000


@dataclass
class Examples:
    texts: list[str]
    labels: list[str] | None  # raw label strings as written in the file, or None for plain text

    def __len__(self) -> int:
        return len(self.texts)


def read_examples(path: str | Path, need_labels: bool = True, limit: int | None = None) -> Examples:
    path = Path(path)
    if not path.is_file():
        raise ZoedgeError(f"{path}: no such data file")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ZoedgeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not raw.strip():
        raise ZoedgeError(f"{path}: empty data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, raw)
    else:
        delimiter = _delimiter(path, raw, "," if suffix == ".csv" else "\t")
        rows = _delimited_rows(path, raw, delimiter)
    if not rows:
        raise ZoedgeError(f"{path}: no examples (only a header?)")
    columns = list(rows[0].keys())
    text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_col is None:
        raise ZoedgeError(f"{path}: no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(columns)})")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if need_labels and label_col is None:
        raise ZoedgeError(f"{path}: no label column (expected one of {', '.join(LABEL_COLUMNS)}; found {', '.join(columns)})")
    texts, labels = [], []
    for i, row in enumerate(rows[:limit] if limit else rows, start=2):
        text = row.get(text_col)
        if text is None or not str(text).strip():
            raise ZoedgeError(f"{path}: row {i} has an empty {text_col!r}")
        if len(str(text)) > MAX_LINE_CHARS:
            raise ZoedgeError(f"{path}: row {i} is longer than {MAX_LINE_CHARS} characters")
        texts.append(str(text).strip())
        if label_col is not None:
            lab = row.get(label_col)
            if need_labels and (lab is None or str(lab).strip() == ""):
                raise ZoedgeError(f"{path}: row {i} has no {label_col!r}")
            labels.append(str(lab).strip() if lab is not None else "")
    return Examples(texts, labels if label_col is not None else None)


DELIMITERS = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}


def _delimiter(path: Path, raw: str, expected: str) -> str:
    """The expected delimiter, unless the header row names a text column only when split by another one
    (a `;`-separated .csv, as spreadsheets in many locales write, or a comma-separated .tsv): then that one."""
    header = raw.lstrip("\ufeff").split("\n", 1)[0].strip("\r")

    def columns(d: str) -> list[str]:
        return [c.strip().strip('"') for c in header.split(d)]

    if any(c in TEXT_COLUMNS for c in columns(expected)):
        return expected
    for d in DELIMITERS:
        if d != expected and any(c in TEXT_COLUMNS for c in columns(d)):
            return d
    if expected not in header:
        seen = [name for d, name in DELIMITERS.items() if d in header]
        raise ZoedgeError(f"{path}: the header row {header[:80]!r} has no {DELIMITERS[expected]} separator and no "
                          f"text column ({', '.join(TEXT_COLUMNS)})" + (f"; it holds {', '.join(seen)}s" if seen else ""))
    return expected


def _delimited_rows(path: Path, raw: str, delimiter: str) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(raw.splitlines(), delimiter=delimiter, quoting=quoting)
    if reader.fieldnames is None:
        raise ZoedgeError(f"{path}: no header row")
    rows = []
    for i, row in enumerate(reader, start=2):
        if None in row:  # more fields than the header
            raise ZoedgeError(f"{path}: row {i} has more fields than the header")
        rows.append({k.strip(): v for k, v in row.items() if k is not None})
    return rows


def _jsonl_rows(path: Path, raw: str) -> list[dict]:
    rows = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZoedgeError(f"{path}: line {i} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ZoedgeError(f"{path}: line {i} is not a JSON object")
        rows.append(obj)
    return rows


def label_indices(examples: Examples, labels: list[str], path: str | Path = "data") -> list[int]:
    """Map raw labels to indices into the bundle's labels; accepts the label name or its index."""
    if examples.labels is None:
        raise ZoedgeError(f"{path}: no labels")
    out = []
    for i, lab in enumerate(examples.labels):
        if lab in labels:
            out.append(labels.index(lab))
        elif lab.isdigit() and int(lab) < len(labels):
            out.append(int(lab))
        else:
            raise ZoedgeError(
                f"{path}: example {i + 1} has label {lab!r}, not one of the bundle's labels ({', '.join(labels)}) or "
                f"their indices{relabel_hint(examples.labels, labels)}"
            )
    return out


def relabel_hint(found: list[str], labels: list[str]) -> str:
    """How to get a bundle for the file's labels: `; the file's labels are ham, spam: re-export ... --labels ham,spam`."""
    names = list(dict.fromkeys(found))
    if len(names) > 50:
        return f"; the file has {len(names)} distinct labels"
    if all(n.isdigit() for n in names):
        k = max(int(n) for n in names) + 1
        return f"; the file's labels are indices up to {k - 1}: re-export the bundle with --labels and {k} names"
    if any("," in n for n in names):
        return f"; the file's labels are {', '.join(repr(n) for n in names[:10])}"
    return f"; the file's labels are {', '.join(names)}: re-export the bundle with --labels {','.join(names)}"
