"""A decoder's probe head start is kept only when it beats the exported head by more than HEAD_START_MIN_GAIN_SE paired
standard errors on the eval data (issue 12, round 7), and a dropped head start trains exactly as no head start; the
kept ZO step, under --min-gain-se, likewise only when it beats step 0 (round 8), and otherwise the patch is step 0."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoedge.runtime.head_start as head_start
from runtime_helpers import quiet, write_toy_split
from zoedge.patchdoc import TRAJECTORY_FILE
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.evaluator import paired_gain
from zoedge.runtime.patch import load_patch_tensors
from zoedge.runtime.trainer import TrainConfig, train


def test_paired_gain_is_the_mean_per_example_difference_and_its_standard_error():
    labels = np.array([0, 1, 0, 1])
    before = np.array([[0.0, 0.0]] * 4)  # log-likelihood log(1/2) on every example
    after = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])  # right, right, wrong, tied
    gain, se = paired_gain(before, after, labels)
    hi, lo = np.log(1 + np.exp(-1.0)), np.log(1 + np.exp(1.0))  # the label's -log p when right / wrong by 1
    d = np.log(2) - np.array([hi, hi, lo, np.log(2)])
    assert gain == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)
    gain, se = paired_gain(before, after, labels, by="accuracy")  # ties go to class 0: right 1, 0, 1, 0 -> 1, 1, 0, 0
    assert gain == 0.0 and se == pytest.approx(np.std([0, 1, -1, 0], ddof=1) / 2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_split(tmp_path_factory.mktemp("toy"), 200, 40)


def _run(bundle, toy, out, **cfg) -> tuple[dict, dict, dict]:
    r = train(bundle, toy[0], out, TrainConfig(steps=6, batch_size=8, eval_every=3, **cfg), eval_path=toy[1],
              log=quiet)
    doc = json.loads((out / "patch.json").read_text())
    return r, doc, load_patch_tensors(out, Bundle.open(bundle).manifest)


def test_a_dropped_head_start_trains_exactly_as_none_and_a_kept_one_starts_from_the_probe(tiny_llama_bundle, toy,
                                                                                          tmp_path, monkeypatch):
    r0, _, t0 = _run(tiny_llama_bundle, toy, tmp_path / "none", head_init="none")
    monkeypatch.setattr(head_start, "HEAD_START_MIN_GAIN_SE", float("inf"))  # no gain is enough: always dropped
    r1, doc1, t1 = _run(tiny_llama_bundle, toy, tmp_path / "dropped", head_init="lp")
    assert r1["eval_accuracy_head_start"] is None and doc1["hyperparameters"]["head_init"] == "lp"
    assert r1["history"] == r0["history"]
    assert np.array_equal(np.load(tmp_path / "dropped" / TRAJECTORY_FILE), np.load(tmp_path / "none" / TRAJECTORY_FILE))
    assert all(np.array_equal(t1[k], t0[k]) for k in t0)
    monkeypatch.setattr(head_start, "HEAD_START_MIN_GAIN_SE", float("-inf"))  # any probe is kept
    r2, _, _ = _run(tiny_llama_bundle, toy, tmp_path / "kept", head_init="lp")
    assert r2["eval_accuracy_head_start"] is not None and r2["history"][0] != r0["history"][0]


def test_min_gain_se_keeps_the_best_step_only_beyond_that_noise_and_otherwise_step_0(tiny_llama_bundle, toy,
                                                                                      tmp_path):
    """Off by default: keep-best as it is, with the best step's paired gain over step 0 recorded; a threshold that
    the same gain does not reach makes the patch step 0 (the exported tensors, an empty trajectory)."""
    r, _, _ = _run(tiny_llama_bundle, toy, tmp_path / "kept", head_init="none")
    g = r["kept_gain"]
    assert r["steps"] > 0 and (g["step"], g["kept"]) == (r["steps"], True) and g["gain"] > 0 < g["se"]
    need = g["gain"] / g["se"] + 0.01  # just out of this gain's reach
    r0, _, t0 = _run(tiny_llama_bundle, toy, tmp_path / "step0", head_init="none", min_gain_se=need)
    assert (r0["steps"], r0["steps_run"], r0["kept_gain"]["kept"]) == (0, 6, False)
    assert r0["kept_gain"]["gain"] == g["gain"]  # the same run up to the decision
    assert r0["eval_accuracy"] == r0["history"][0]["eval_accuracy"]
    exported = Bundle.open(tiny_llama_bundle).initial_trainables()
    assert all(np.array_equal(t0[k], exported[k]) for k in exported)
    assert np.load(tmp_path / "step0" / TRAJECTORY_FILE).shape[0] == 0
    r1, _, _ = _run(tiny_llama_bundle, toy, tmp_path / "kept2", head_init="none", min_gain_se=need - 0.02)
    assert r1["steps"] == r["steps"] and r1["kept_gain"]["kept"]
