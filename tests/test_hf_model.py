"""A patch as a runnable Hugging Face / peft model (zoedge.export.hf_model.PatchedClassifier): its logits on real
SST-2 sentences equal the fp32 bundle's with the same patch (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import export_tiny, run_cli
from patch_factory import make_patch, rewrite_doc
from zoedge.errors import ZoedgeError
from zoedge.export.hf_model import PatchedClassifier
from zoedge.runtime.predict import Predictor, read_inputs


def sentences(sst2, n: int) -> list[str]:
    return read_inputs(sst2 / "test.tsv")[0][:n]


def bundle_logits(bundle, patch, texts):
    (logits,) = Predictor(bundle, patch).evaluator.outputs(texts, ("logits",))
    return logits


def test_encoder_patch_loads_with_peft_and_matches_the_bundle(tiny_bert_bundle, sst2, tmp_path):
    from peft import PeftModel

    patch = make_patch(tiny_bert_bundle, tmp_path / "p", steps=8, start_head=True, seed=11, lr=5e-2)
    texts = sentences(sst2, 48)
    clf = PatchedClassifier.from_patch(tiny_bert_bundle, patch)
    assert isinstance(clf.model, PeftModel)
    got, want = clf.logits(texts), bundle_logits(tiny_bert_bundle, patch, texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert clf.predict(texts) == [clf.manifest.labels[i] for i in want.argmax(1)]
    # LoRA folded into the weights gives the same outputs without peft at inference
    merged = PatchedClassifier(clf.merged(), clf.manifest, clf.encoder)
    np.testing.assert_allclose(merged.logits(texts), want, atol=1e-5)


def test_decoder_patch_is_read_through_its_prompt(tiny_llama_bundle, sst2, tmp_path):
    patch = make_patch(tiny_llama_bundle, tmp_path / "p", steps=5, start_head=True, seed=12, lr=5e-2)
    rewrite_doc(patch, prompt_template="Review: {sentence} Sentiment:")
    texts = sentences(sst2, 24)
    clf = PatchedClassifier.from_patch(tiny_llama_bundle, patch)
    assert clf.encoder.template == "Review: {sentence} Sentiment:"
    np.testing.assert_allclose(clf.logits(texts), bundle_logits(tiny_llama_bundle, patch, texts), atol=1e-4)


def test_a_head_only_patch_loads_without_peft(sst2, tmp_path):
    bundle = export_tiny(tmp_path / "b", "tiny-bert", "--trainable", "head")
    patch = make_patch(bundle, tmp_path / "p", steps=4, start_head=True, seed=13, lr=5e-2)
    texts = sentences(sst2, 16)
    clf = PatchedClassifier.from_patch(bundle, patch)
    np.testing.assert_allclose(clf.logits(texts), bundle_logits(bundle, patch, texts), atol=1e-5)


def test_refuses_a_patch_of_another_bundle(tiny_bert_bundle, tiny_llama_bundle, tmp_path):
    patch = make_patch(tiny_llama_bundle, tmp_path / "p", steps=1)
    with pytest.raises(ZoedgeError, match="another base model"):
        PatchedClassifier.from_patch(tiny_bert_bundle, patch)


@pytest.mark.slow
def test_minilm_patch_as_a_peft_model_matches_the_fp32_bundle(sst2, tmp_path):
    bundle = tmp_path / "minilm"
    run_cli("export", "minilm", "--quant", "fp32", "--out", bundle, check=True)
    patch = make_patch(bundle, tmp_path / "p", steps=20, start_head=True, seed=14, lr=1e-2)
    texts = sentences(sst2, 64)
    clf = PatchedClassifier.from_patch(bundle, patch)
    got, want = clf.logits(texts), bundle_logits(bundle, patch, texts)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
