"""Issue 15's small fixes: a hint to re-export for a file's own labels, duplicate --labels refused, `;`-separated
files read, `verify --n` honoured with a PASS / FAIL verdict, `inspect` failing on a damaged bundle, and files
written with ordinary permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from conftest import run_cli
from patch_factory import make_patch
from zoedge.errors import ZoedgeError
from zoedge.export.verify import verdict, verify_bundle
from zoedge.fsio import mkdtemp_in
from zoedge.manifest import Manifest, sha256_file
from zoedge.runtime.data import read_examples


def one_error_line(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoedge: error: "), p.stderr
    return lines[0]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_with_other_labels_gets_a_hint_to_re_export(tiny_bert_bundle, tmp_path):
    data = tmp_path / "mail.tsv"
    data.write_text("sentence\tlabel\nwin money now\tspam\nlunch at noon?\tham\nfree prize\tspam\n")
    for cmd in (("train", tiny_bert_bundle, "--data", data, "--out", tmp_path / "p", "--steps", "1"),
                ("eval", tiny_bert_bundle, "--data", data)):
        line = one_error_line(run_cli(*cmd))
        assert "has label 'spam'" in line and "re-export the bundle with --labels spam,ham" in line, line
    data.write_text("sentence\tlabel\na\t0\nb\t3\n")
    line = one_error_line(run_cli("eval", tiny_bert_bundle, "--data", data))
    assert "indices up to 3: re-export the bundle with --labels and 4 names" in line


def test_duplicate_labels_are_refused(tmp_path):
    line = one_error_line(run_cli("export", "tiny-bert", "--out", tmp_path / "b", "--labels", "ham,spam,ham"))
    assert "'ham' given more than once" in line and not (tmp_path / "b").exists()
    m = {"model_id": "x", "architecture": "bert", "kind": "encoder", "task": "classify", "max_length": 8, "inputs": [],
         "outputs": [], "trainables": [], "trainable_kinds": [], "base_sha256": "0", "labels": ["ham", "spam", "ham"],
         "schema_version": 1}
    with pytest.raises(ZoedgeError, match="duplicate label"):
        Manifest.from_dict(m)


def test_semicolon_separated_files_are_read_and_a_bad_header_is_named(tmp_path):
    (tmp_path / "a.csv").write_text('sentence;label\n"fine; really";1\nbad;0\n')
    ex = read_examples(tmp_path / "a.csv")
    assert ex.texts == ["fine; really", "bad"] and ex.labels == ["1", "0"]
    (tmp_path / "b.tsv").write_text("text,label\nok,1\n")  # a comma-separated .tsv
    assert read_examples(tmp_path / "b.tsv").texts == ["ok"]
    (tmp_path / "c.csv").write_text("foo;bar\n1;2\n")
    with pytest.raises(ZoedgeError, match="has no comma separator and no text column .* it holds semicolons"):
        read_examples(tmp_path / "c.csv")


def test_verify_uses_n_inputs_and_gives_a_verdict(tiny_bert_bundle, tmp_path):
    r = verify_bundle(tiny_bert_bundle, n=32)
    assert r["n"] == 32
    assert verdict(r)[0] is True
    assert verdict({**r, "prediction_agreement": 0.9})[0] is False
    assert verdict({**r, "quantization": "int8", "prediction_agreement": 0.9, "max_abs_diff": 0.3})[0] is True
    p = run_cli("verify", tiny_bert_bundle, "--n", "20", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["n"] == 20 and out["passed"] is True
    # a bundle whose graph no longer computes the source model fails, exit 1
    import onnx
    from onnx import numpy_helper

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_bundle, bad)
    model = onnx.load(str(bad / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the word embeddings
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    onnx.save(model, str(bad / "model.onnx"))
    m = Manifest.load(bad)
    m.files["model.onnx"] = sha256_file(bad / "model.onnx")
    m.save(bad)
    p = run_cli("verify", bad)
    assert p.returncode == 1 and ": FAIL: " in p.stdout, (p.stdout, p.stderr)


def test_inspect_fails_on_a_bundle_with_a_deleted_or_edited_file(tiny_bert_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bert_bundle, b)
    assert run_cli("inspect", b).returncode == 0
    (b / "tokenizer.json").unlink()
    p = run_cli("inspect", b)
    assert "model       tiny-bert" in p.stdout  # the summary is still printed
    assert "tokenizer.json is missing" in one_error_line(p)
    shutil.copyfile(tiny_bert_bundle / "tokenizer.json", b / "tokenizer.json")
    with open(b / "trainable.safetensors", "ab") as f:
        f.write(b"x")
    assert "trainable.safetensors does not match its sha256" in one_error_line(run_cli("inspect", b))


def test_bundle_and_patch_files_have_ordinary_permissions(tiny_bert_bundle, tmp_path):
    mode = 0o666 & ~umask()
    assert stat.S_IMODE(tiny_bert_bundle.stat().st_mode) == 0o777 & ~umask()  # the bundle directory itself
    for f in tiny_bert_bundle.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
    patch = make_patch(tiny_bert_bundle, tmp_path / "p", start_head=True)
    for f in patch.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
    d = mkdtemp_in(tmp_path, "x")
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask() and d.name.startswith(".x.")
