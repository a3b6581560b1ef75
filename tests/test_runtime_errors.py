"""Bad training / eval input: one clear line, exit != 0, no existing checkpoint or patch overwritten."""

from __future__ import annotations

import pytest

from conftest import run_cli
from runtime_helpers import write_sentiment


@pytest.fixture()
def files(tmp_path):
    good = write_sentiment(tmp_path / "good.tsv", 20)
    bad = {
        "missing column": ("nolabel.tsv", "sentence\tscore\nfine\t1\n".encode()),
        "empty": ("empty.tsv", b""),
        "unknown label": ("unknown.tsv", "sentence\tlabel\nfine\tmaybe\n".encode()),
        "non-UTF-8": ("latin.tsv", "sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1")),
        "header only": ("header.tsv", b"sentence\tlabel\n"),
        "bad jsonl": ("bad.jsonl", b'{"text": "ok", "label": 1}\n{oops\n'),
    }
    paths = {}
    for kind, (name, data) in bad.items():
        (tmp_path / name).write_bytes(data)
        paths[kind] = tmp_path / name
    return good, paths


@pytest.mark.parametrize("kind, message", [
    ("missing column", "no label column"), ("empty", "empty data file"), ("unknown label", "not one of the bundle's labels"),
    ("non-UTF-8", "not UTF-8"), ("header only", "no examples"), ("bad jsonl", "not JSON"),
])
def test_bad_data(tiny_bert_bundle, files, tmp_path, kind, message):
    _, bad = files
    out = tmp_path / "patch"
    p = run_cli("train", tiny_bert_bundle, "--data", bad[kind], "--out", out, "--steps", "2")
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("zoedge: error:")]
    assert len(err) == 1 and message in err[0], p.stderr[-1500:]
    assert not out.exists()


def test_existing_patch_is_not_overwritten(tiny_bert_bundle, files, tmp_path):
    good, _ = files
    out = tmp_path / "patch"
    run_cli("train", tiny_bert_bundle, "--data", good, "--out", out, "--steps", "2", check=True)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = run_cli("train", tiny_bert_bundle, "--data", good, "--out", out, "--steps", "2")
    assert p.returncode != 0 and "not empty" in p.stderr
    p = run_cli("train", tiny_bert_bundle, "--data", good, "--out", out, "--steps", "2", "--resume")
    assert p.returncode == 0 and "already holds the finished patch" in p.stderr  # the same job, done: no-op
    p = run_cli("train", tiny_bert_bundle, "--data", good, "--out", out, "--steps", "3", "--resume")
    assert p.returncode != 0 and "other settings" in p.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_unreadable_bundle(tmp_path, files):
    good, _ = files
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"schema_version": 1}')
    p = run_cli("train", tmp_path / "b", "--data", good, "--out", tmp_path / "p")
    assert p.returncode != 0 and "manifest" in p.stderr and "Traceback" not in p.stderr


def test_tampered_bundle_file(tiny_bert_bundle, tmp_path, files):
    import shutil

    good, _ = files
    b = tmp_path / "b"
    shutil.copytree(tiny_bert_bundle, b)
    with open(b / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    p = run_cli("eval", b, "--data", good)
    assert p.returncode != 0 and "does not match its sha256" in p.stderr


def test_patch_for_another_base(tiny_bert_bundle, tiny_llama_bundle, files, tmp_path):
    good, _ = files
    run_cli("train", tiny_llama_bundle, "--data", good, "--out", tmp_path / "lp", "--steps", "2", check=True)
    p = run_cli("eval", tiny_bert_bundle, "--data", good, "--patch", tmp_path / "lp")
    assert p.returncode != 0 and "another base model" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "adamw"], "bad --optimizer"), (["--objective", "lm"], "bad --objective"),
    (["--max-memory", "lots"], "bad memory size"), (["--steps", "0"], "bad --steps"),
    (["--batched"], "copies axis"),
])
def test_bad_train_options(tiny_bert_bundle, files, tmp_path, args, message):
    good, _ = files
    p = run_cli("train", tiny_bert_bundle, "--data", good, "--out", tmp_path / "p", *args)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-800:]
    assert not (tmp_path / "p").exists()
