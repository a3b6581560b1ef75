"""`zoedge train --unlabelled`: the EM estimate of the device data's label prior (Saerens et al. 2002) and the bias
shift it puts into the patch (issue 12: a head fitted on a balanced k-shot set, tested on imbalanced Drugs.com)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from runtime_helpers import quiet, write_sentiment, write_toy_split
from zoedge.constants import PRIOR_FLOOR, PRIOR_MIN_SE
from zoedge.errors import ZoedgeError
from zoedge.patchdoc import PatchDoc
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.head_grad import head_names
from zoedge.runtime.patch import load_patch_tensors, replay_patch
from zoedge.runtime.prior import em_prior, informative, training_prior
from zoedge.runtime.trainer import TrainConfig, train


def _gaussian_logits(prior: list[float], n: int, seed: int) -> np.ndarray:
    """Exact class log-likelihoods of two unit Gaussians at -1 and +1 for n draws from `prior`: the logits of a
    calibrated model trained under a uniform prior."""
    rng = np.random.Generator(np.random.PCG64(seed))
    y = rng.choice(len(prior), size=n, p=prior)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    return np.stack([-(x + 1) ** 2 / 2, -(x - 1) ** 2 / 2], axis=1)


def test_em_recovers_a_shifted_prior_within_its_sampling_noise():
    # 4,000 draws: the empirical share of class 0 alone has SE sqrt(.8 * .2 / 4000) = 0.0063; EM's estimate through
    # overlapping classes (Bayes error 16%) is noisier, about 2x: 0.03 is > 2 of those SEs
    for target, seed in (([0.8, 0.2], 0), ([0.3, 0.7], 1), ([0.5, 0.5], 2)):
        est = em_prior(_gaussian_logits(target, 4000, seed), np.array([0.5, 0.5]))
        assert est.target == pytest.approx(target, abs=0.03)
        assert est.shift == pytest.approx(np.log(est.target) - np.log([0.5, 0.5]))
        assert est.target.sum() == pytest.approx(1.0)


def test_a_class_the_texts_never_show_keeps_the_floor_and_a_finite_shift():
    logits = np.array([[10.0, -10.0, -10.0]] * 50 + [[-10.0, 10.0, -10.0]] * 50)
    est = em_prior(logits, np.full(3, 1 / 3))
    assert est.target[2] >= PRIOR_FLOOR * 0.99 and np.isfinite(est.shift).all()
    assert est.target[:2] == pytest.approx([0.5, 0.5], abs=1e-3)


def test_training_prior_is_add_one_smoothed():
    assert training_prior(np.array([0, 0, 1, 1]), 2) == pytest.approx([0.5, 0.5])
    assert training_prior(np.array([0, 0, 0]), 2) == pytest.approx([0.8, 0.2])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("prior")
    train_path, dev_path = write_toy_split(d, 200, 40)
    pool = write_sentiment(d / "pool.tsv", 400, seed=7)
    lines = pool.read_text().splitlines()
    positive = [line.split("\t")[0] for line in lines[1:] if line.endswith("\t1")]
    negative = [line.split("\t")[0] for line in lines[1:] if line.endswith("\t0")]
    texts = positive[:90] + negative[:10]  # 90% positive, no labels in the file
    (d / "unlabelled.tsv").write_text("sentence\n" + "\n".join(texts) + "\n")
    return train_path, dev_path, d / "unlabelled.tsv"


def _train(bundle, toy, out, unlabelled=None, **cfg):
    c = TrainConfig(steps=6, batch_size=8, eval_every=3, keep="last", **cfg)
    return train(bundle, toy[0], out, c, eval_path=toy[1], log=quiet, unlabelled=unlabelled)


def test_the_shift_lands_in_the_bias_only_and_the_patch_replays(tiny_llama_bundle, toy, tmp_path):
    m = Bundle.open(tiny_llama_bundle).manifest
    weight, bias = head_names(m)
    _train(tiny_llama_bundle, toy, tmp_path / "plain")
    r = _train(tiny_llama_bundle, toy, tmp_path / "shifted", unlabelled=toy[2])
    plain = load_patch_tensors(tmp_path / "plain", m)
    shifted = load_patch_tensors(tmp_path / "shifted", m)
    doc = json.loads((tmp_path / "shifted" / "patch.json").read_text())
    lp = doc["label_prior"]
    labels = np.array([int(line[-1]) for line in toy[0].read_text().splitlines()[1:]])
    assert r["label_prior"] == lp and lp["unlabelled"] == 100
    assert lp["source"] == pytest.approx(training_prior(labels, 2).tolist(), abs=1e-6)
    assert sum(lp["estimated"]) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(lp["bias_shift"], np.log(lp["estimated"]) - np.log(lp["source"]), atol=1e-5)
    assert np.abs(lp["bias_shift"]).max() > 0
    for k in plain:  # the same training run; only the bias differs, by exactly the recorded shift
        if k == bias:
            assert np.allclose(shifted[k] - plain[k], lp["bias_shift"], atol=1e-5)
        else:
            assert np.array_equal(shifted[k], plain[k]), k
    replayed = replay_patch(tmp_path / "shifted", tiny_llama_bundle)
    assert all(np.array_equal(replayed[k], shifted[k]) for k in shifted)


def test_unlabelled_is_refused_before_training_where_the_shift_cannot_replay(tiny_llama_bundle, toy, tmp_path):
    with pytest.raises(ZoedgeError, match="exact gradient"):
        _train(tiny_llama_bundle, toy, tmp_path / "zo-head", unlabelled=toy[2], head_lr=0.0)
    with pytest.raises(ZoedgeError, match="no such data file"):
        _train(tiny_llama_bundle, toy, tmp_path / "missing", unlabelled=tmp_path / "nope.tsv")
    assert not (tmp_path / "zo-head" / "patch.json").exists() and not (tmp_path / "missing" / "patch.json").exists()


def test_cli_unlabelled_bad_file_is_one_line_and_nonzero(tiny_llama_bundle, toy, tmp_path):
    r = run_cli("train", str(tiny_llama_bundle), "--data", str(toy[0]), "--out", str(tmp_path / "p"),
                "--steps", "2", "--unlabelled", str(tmp_path / "nope.tsv"))
    assert r.returncode != 0 and "no such data file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_informative_counts_standard_errors_above_the_majority_rate():
    labels = np.repeat([0, 1, 2], 16)  # a balanced k=16 eval set: majority rate 1/3, SE 0.068
    z, p0 = informative(19 / 48, labels)  # MiniLM Drugs.com's kept model: 0.92 SE, EM not trusted
    assert p0 == pytest.approx(1 / 3) and z == pytest.approx(0.919, abs=1e-3) and z < PRIOR_MIN_SE
    z, _ = informative(28 / 48, labels)  # SmolLM2's: 3.67 SE
    assert z == pytest.approx(3.674, abs=1e-3) and z > PRIOR_MIN_SE


def test_a_model_no_better_than_a_constant_on_eval_keeps_its_bias(tiny_llama_bundle, toy, tmp_path):
    """The eval labels flipped: the same model scores far below the majority rate there, so EM's estimate is not
    trusted; the patch is the plain run's, and it records why (the PatchDoc validator accepts that form)."""
    lines = toy[1].read_text().splitlines()
    flipped = tmp_path / "flipped.tsv"
    flipped.write_text("\n".join([lines[0]] + [f"{ln[:-1]}{1 - int(ln[-1])}" for ln in lines[1:]]) + "\n")
    m = Bundle.open(tiny_llama_bundle).manifest
    c = TrainConfig(steps=6, batch_size=8, eval_every=3, keep="last")
    messages: list[str] = []
    train(tiny_llama_bundle, toy[0], tmp_path / "plain", c, eval_path=flipped, log=quiet)
    r = train(tiny_llama_bundle, toy[0], tmp_path / "p", c, eval_path=flipped, log=messages.append, unlabelled=toy[2])
    assert r["label_prior"]["unlabelled"] == 100 and "too weak" in r["label_prior"]["skipped"]
    assert any("label prior not adapted" in x for x in messages), messages
    plain, kept = load_patch_tensors(tmp_path / "plain", m), load_patch_tensors(tmp_path / "p", m)
    assert all(np.array_equal(plain[k], kept[k]) for k in plain)
    assert PatchDoc.load(tmp_path / "p").label_prior == r["label_prior"]
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    doc["label_prior"]["skipped"] = 3
    with pytest.raises(ZoedgeError, match="must be a reason"):
        PatchDoc.from_dict(doc)
