"""patch.json as one contract (zoedge.patchdoc.PatchDoc): one writer, one validator, old docs still load;
`zoedge eval` and `zoedge patch replay` refuse a patch made for another bundle (issue 13)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import export_tiny, run_cli
from patch_factory import make_patch, rewrite_doc
from runtime_helpers import write_sentiment
from zoedge.errors import ZoedgeError
from zoedge.manifest import MANIFEST_FILE, Manifest
from zoedge.patchdoc import PATCH_FILE, PATCH_FORMAT, PatchDoc, trainables_digest
from zoedge.runtime.evaluate import evaluate
from zoedge.runtime.patch import read_patch, replay_patch, write_patch
from zoedge.runtime.tensors import tensor_digest
from zoedge.runtime.zo import ZOConfig

OLD_KEYS = ("labels", "trainables_sha256", "kind", "zoedge_version", "version", "parents")


@pytest.fixture(scope="module")
def patch(tiny_bert_bundle, tmp_path_factory):
    return make_patch(tiny_bert_bundle, tmp_path_factory.mktemp("pc") / "p", steps=5, run_seed=3, seed=3,
                      start_head=True)


@pytest.fixture(scope="module")
def spam_bundle(tmp_path_factory):
    """tiny-bert again, labels ham/spam: same base, same initial tensors as the default (negative/positive)."""
    return export_tiny(tmp_path_factory.mktemp("spam") / "tiny-bert-spam", "tiny-bert", "--labels", ["ham", "spam"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sentiment(tmp_path_factory.mktemp("data") / "d.tsv", 24)


def raw(patch_dir) -> dict:
    return json.loads((patch_dir / PATCH_FILE).read_text())


def bundle_copy(src, dest, **changes):
    """The bundle with its manifest edited (manifest.json is not among the hashed files)."""
    shutil.copytree(src, dest)
    m = json.loads((dest / MANIFEST_FILE).read_text())
    m.update(changes)
    (dest / MANIFEST_FILE).write_text(json.dumps(m))
    return dest


# ---- the document ----------------------------------------------------------------------------------------
def test_written_doc_records_the_bundle_and_round_trips(patch, tiny_bert_bundle):
    m = Manifest.load(tiny_bert_bundle)
    d = raw(patch)
    doc = PatchDoc.load(patch)
    assert doc.to_dict() == d and PatchDoc.from_dict(d) == doc
    assert (d["format"], d["kind"], d["bundle_id"], d["labels"]) == (PATCH_FORMAT, "device", m.bundle_id, m.labels)
    assert d["trainables_sha256"] == trainables_digest(m) and d["base_sha256"] == m.base_sha256
    assert doc.steps == 5 and doc.run_seed == 3 and doc.zo == ZOConfig().to_dict()
    assert "prompt_template" not in d and "seconds" not in d  # unset optional fields are left out


def test_unknown_keys_are_ignored(patch):
    d = raw(patch)
    d["from_the_future"] = {"x": 1}
    assert PatchDoc.from_dict(d).adapter_sha256 == d["adapter_sha256"]


def test_old_doc_without_labels_or_trainables_still_loads_and_evaluates(patch, tiny_bert_bundle, data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(patch, old)
    d = raw(old)
    for k in OLD_KEYS:
        d.pop(k)
    (old / PATCH_FILE).write_text(json.dumps(d))
    doc = PatchDoc.load(old)
    assert doc.labels is None and doc.trainables_sha256 == "" and doc.kind == "device"
    assert read_patch(old)["adapter_sha256"] == d["adapter_sha256"]
    assert evaluate(tiny_bert_bundle, data, patch=old)["n"] == 24
    assert tensor_digest(replay_patch(old, tiny_bert_bundle)) == d["adapter_sha256"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="zoedge-patch/9"), "unknown patch format"),
    (lambda d: d.pop("files"), "no 'files' table"),
    (lambda d: d["files"].update({"../../etc/passwd": "0" * 64}), "not a patch file"),
    (lambda d: d.pop("base_sha256"), "'base_sha256' is missing"),
    (lambda d: d.update(steps=-1), "'steps' must be a non-negative integer"),
    (lambda d: d.update(examples="3"), "'examples' must be a non-negative integer"),
    (lambda d: d.update(metrics=[1]), "'metrics' must be an object"),
    (lambda d: d.update(run_seed="abc"), "'run_seed' must be a non-negative integer"),
    (lambda d: d.update(run_seed=True), "'run_seed' must be a non-negative integer"),
    (lambda d: d.update(zo=[1, 2]), "'zo'"),
    (lambda d: d["zo"].update(perturbations=0), "zo.perturbations"),
    (lambda d: d["zo"].update(eps=float("nan")), "zo.eps must be a finite number"),
    (lambda d: d["zo"].update(roles="head"), "zo.roles"),
    (lambda d: d.update(kind="weird"), "'kind' must be one of device, global"),
    (lambda d: d.update(labels=[0, 1]), "'labels' must be a list of strings"),
    (lambda d: d.update(prompt_template="no placeholder"), "prompt_template must be a string containing"),
    (lambda d: d.update(seconds=-1.0), "'seconds' must be a non-negative number"),
    (lambda d: d.update(bundle_id=7), "'bundle_id' must be a string"),
])
def test_bad_docs_are_one_line_refusals(patch, mutate, message):
    d = raw(patch)
    mutate(d)
    with pytest.raises(ZoedgeError, match=message) as e:
        PatchDoc.from_dict(d)
    assert "\n" not in str(e.value) and str(e.value).startswith(PATCH_FILE)


def test_not_json_and_not_an_object(tmp_path):
    (tmp_path / PATCH_FILE).write_text("[1, 2]")
    with pytest.raises(ZoedgeError, match="not a JSON object"):
        PatchDoc.load(tmp_path)
    (tmp_path / PATCH_FILE).write_text("{nope")
    with pytest.raises(ZoedgeError, match="not valid JSON"):
        PatchDoc.load(tmp_path)


def test_write_patch_refuses_an_unknown_field(tiny_bert_bundle, tmp_path):
    m = Manifest.load(tiny_bert_bundle)
    with pytest.raises(TypeError, match="no field 'colour'"):
        write_patch(tmp_path / "p", m, {"x": np.zeros(2, np.float32)}, np.zeros((0, 2), np.float32), {},
                    {"steps": 0, "colour": "blue"})
    assert not (tmp_path / "p" / PATCH_FILE).exists()


def test_rewrite_doc_goes_through_the_validator(patch, tmp_path):
    p = tmp_path / "p"
    shutil.copytree(patch, p)
    rewrite_doc(p, prompt_template="A: {sentence}", examples=7)
    assert (PatchDoc.load(p).prompt_template, PatchDoc.load(p).examples) == ("A: {sentence}", 7)
    with pytest.raises(ZoedgeError, match="prompt_template"):
        rewrite_doc(p, prompt_template="no placeholder")


# ---- does the patch belong to the bundle? -----------------------------------------------------------------
def test_reexport_with_same_labels_and_tensors_is_compatible(patch, tiny_bert_bundle, data, tmp_path):
    again = bundle_copy(tiny_bert_bundle, tmp_path / "again", bundle_id="f" * 32)
    assert evaluate(again, data, patch=patch)["n"] == 24
    replay_patch(patch, again)


@pytest.mark.parametrize("changes, message", [
    ({"bundle_id": "f" * 32, "labels": ["ham", "spam"]}, "trained for labels \\[negative, positive\\] but this "
                                                         "bundle classifies \\[ham, spam\\]"),
    ({"labels": ["neg", "pos"]}, "trained for labels"),  # same id, edited labels: still refused
])
def test_patch_for_other_labels_is_refused(patch, tiny_bert_bundle, data, tmp_path, changes, message):
    other = bundle_copy(tiny_bert_bundle, tmp_path / "other", **changes)
    with pytest.raises(ZoedgeError, match=message):
        evaluate(other, data, patch=patch)
    with pytest.raises(ZoedgeError, match=message):
        replay_patch(patch, other)


def test_patch_for_other_trainables_is_refused(patch, tiny_bert_bundle):
    m = Manifest.load(tiny_bert_bundle)
    m.trainables = m.trainables[:-1]
    with pytest.raises(ZoedgeError, match="other tensors"):
        PatchDoc.load(patch).check_fits(m)


def test_old_patch_on_another_bundle_id_is_refused(patch, tiny_bert_bundle, data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(patch, old)
    d = raw(old)
    for k in ("labels", "trainables_sha256"):
        d.pop(k)
    (old / PATCH_FILE).write_text(json.dumps(d))
    again = bundle_copy(tiny_bert_bundle, tmp_path / "again", bundle_id="f" * 32)
    with pytest.raises(ZoedgeError, match="records no labels or trainables"):
        evaluate(again, data, patch=old)


def test_cli_eval_and_replay_refuse_a_spam_patch_on_the_sentiment_bundle(tiny_bert_bundle, spam_bundle, data,
                                                                        tmp_path):
    """The issue's case: a ham/spam patch evaluated on the negative/positive bundle of the same base model
    (same initial tensors) exited 0."""
    spam_patch = make_patch(spam_bundle, tmp_path / "spam", steps=3, run_seed=5, seed=5)
    ok = run_cli("eval", spam_bundle, "--patch", spam_patch, "--data", data, "--json")
    assert ok.returncode == 0, ok.stderr
    for args in (["eval", tiny_bert_bundle, "--patch", spam_patch, "--data", data],
                 ["patch", "replay", spam_patch, "--bundle", tiny_bert_bundle, "--out", tmp_path / "r"]):
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "labels [ham, spam]" in err and "[negative, positive]" in err, err
        assert f"{spam_patch}: patch was trained for labels" in err, err  # the user's path, not a scratch copy
    assert not (tmp_path / "r").exists()
