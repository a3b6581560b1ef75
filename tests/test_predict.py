"""`zoedge predict` (files with and without labels, plain lines, stdin) and `zoedge patch merge` (a plain
inference bundle that predicts exactly what bundle + patch predicts)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_cli
from patch_factory import make_patch, rewrite_doc
from runtime_helpers import write_sentiment
from zoedge.device.merge import merge_patch
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.evaluate import evaluate
from zoedge.runtime.predict import Predictor, read_inputs

SENTENCES = ["a wonderful film", "the plot was dull and boring", "quite lovely acting", "it was awful"]


def lines_of(p: subprocess.CompletedProcess) -> list[dict]:
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.fixture(scope="module")
def bert_patch(tiny_bert_bundle, tmp_path_factory):
    return make_patch(tiny_bert_bundle, tmp_path_factory.mktemp("p") / "patch", steps=6, start_head=True, seed=3)


def test_predict_a_labelled_tsv_gives_one_json_line_per_input_with_the_expected_label(tiny_bert_bundle, bert_patch,
                                                                                       tmp_path):
    data = write_sentiment(tmp_path / "dev.tsv", 20, seed=5)
    rows = lines_of(run_cli("predict", tiny_bert_bundle, "--patch", bert_patch, "--data", data))
    assert len(rows) == 20
    for r in rows:
        assert set(r) == {"text", "label", "probabilities", "expected"}
        assert r["label"] in ("negative", "positive") and r["expected"] in ("negative", "positive")
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    # the accuracy printed on stderr is the one `zoedge eval` reports
    acc = evaluate(tiny_bert_bundle, data, patch=bert_patch)["accuracy"]
    assert sum(r["label"] == r["expected"] for r in rows) / 20 == pytest.approx(acc)


def test_predict_reads_unlabelled_jsonl_plain_lines_and_stdin(tiny_bert_bundle, bert_patch, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n\n")
    pred = Predictor(tiny_bert_bundle, bert_patch)
    want = pred(SENTENCES)
    for name in ("in.jsonl", "in.txt"):
        texts, labels = read_inputs(tmp_path / name)
        assert texts == SENTENCES and labels is None
    rows = lines_of(run_cli("predict", tiny_bert_bundle, "--patch", bert_patch, "--data", tmp_path / "in.txt"))
    assert [r["text"] for r in rows] == SENTENCES and "expected" not in rows[0]
    for r, w in zip(rows, want):
        assert r["label"] == w["label"] and r["probabilities"] == pytest.approx(w["probabilities"], abs=2e-6)
    # one sentence on stdin: one line back
    p = subprocess.run([sys.executable, "-m", "zoedge", "predict", str(tiny_bert_bundle), "--patch", str(bert_patch),
                        "--data", "-"], input="a wonderful film\n", capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    (row,) = lines_of(p)
    assert row["text"] == "a wonderful film" and row["label"] == want[0]["label"]
    # a TSV piped in (header first) keeps its labels
    tsv = "sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES))
    p = subprocess.run([sys.executable, "-m", "zoedge", "predict", str(tiny_bert_bundle), "--patch", str(bert_patch),
                        "--data", "-"], input=tsv, capture_output=True, text=True, cwd=REPO, timeout=120)
    rows = lines_of(p)
    assert [r["text"] for r in rows] == SENTENCES and [r["expected"] for r in rows][:2] == ["negative", "positive"]


def test_predict_without_a_patch_says_the_bundle_is_untrained(tiny_bert_bundle, tmp_path):
    (tmp_path / "in.txt").write_text("a wonderful film\n")
    p = run_cli("predict", tiny_bert_bundle, "--data", tmp_path / "in.txt")
    assert len(lines_of(p)) == 1 and "untrained" in p.stderr


def test_merged_bundle_predicts_what_bundle_and_patch_predict(tiny_bert_bundle, bert_patch, tmp_path):
    out = tmp_path / "merged"
    p = run_cli("patch", "merge", tiny_bert_bundle, bert_patch, "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    m = Manifest.load(out)
    assert m.trainables == [] and m.merged_from["bundle_id"] == Manifest.load(tiny_bert_bundle).bundle_id
    assert sorted(os.listdir(out)) == ["manifest.json", "model.onnx", "tokenizer.json"]
    data = write_sentiment(tmp_path / "dev.tsv", 40, seed=9)
    texts, _ = read_inputs(data)
    a = Predictor(tiny_bert_bundle, bert_patch).probabilities(texts)
    b = Predictor(out).probabilities(texts)
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert evaluate(out, data)["accuracy"] == evaluate(tiny_bert_bundle, data, patch=bert_patch)["accuracy"]
    rows = lines_of(run_cli("predict", out, "--data", data))
    assert len(rows) == 40 and "untrained" not in " ".join(rows[0])
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert "merged" in run_cli("inspect", out, check=True).stdout
    # merging again, or into a non-empty directory, is refused
    with pytest.raises(ZoedgeError, match="no trainable inputs"):
        merge_patch(out, bert_patch, tmp_path / "again")
    p = run_cli("patch", "merge", tiny_bert_bundle, bert_patch, "--out", out)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not an empty directory" in p.stderr


def test_a_decoder_patch_is_merged_and_predicted_through_its_prompt(tiny_llama_bundle, tmp_path):
    patch = make_patch(tiny_llama_bundle, tmp_path / "p", steps=3, start_head=True)
    rewrite_doc(patch, prompt_template="Review: {sentence} Sentiment:")
    pred = Predictor(tiny_llama_bundle, patch)
    assert pred.bundle.encoder.template == "Review: {sentence} Sentiment:"
    merge_patch(tiny_llama_bundle, patch, tmp_path / "merged")
    assert Manifest.load(tmp_path / "merged").prompt_template == "Review: {sentence} Sentiment:"
    np.testing.assert_allclose(Predictor(tmp_path / "merged").probabilities(SENTENCES),
                               pred.probabilities(SENTENCES), atol=1e-5)


def test_merge_without_onnx_says_how_to_install_it(tiny_bert_bundle, bert_patch, tmp_path):
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from zoedge.cli import app; app(prog_name='zoedge')")
    p = subprocess.run([sys.executable, "-c", code, "patch", "merge", str(tiny_bert_bundle), str(bert_patch), "--out",
                        str(tmp_path / "m")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "pip install onnx" in p.stderr
    assert not (tmp_path / "m").exists()


def test_predict_refuses_a_foreign_patch_in_one_line(tiny_bert_bundle, tiny_llama_bundle, tmp_path):
    patch = make_patch(tiny_llama_bundle, tmp_path / "p", steps=1)
    (tmp_path / "in.txt").write_text("hello\n")
    p = run_cli("predict", tiny_bert_bundle, "--patch", patch, "--data", tmp_path / "in.txt")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "another base model" in p.stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
