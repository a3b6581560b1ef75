"""Issue 14: under --head-lr the mean of the ± forwards' features is summed in place into a kept buffer, not
stacked every step; it must give np.mean(features, axis=0)'s bytes (the expression it replaced, commit cf035df),
signed zeros included."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from runtime_helpers import quiet, write_toy_split
from zoedge.runtime.estimate import Estimator
from zoedge.runtime.patch import ADAPTER_FILE
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import TrainConfig, train


def reference_head_features(self):
    """zoedge.runtime.estimate.Estimator.head_features at cf035df (the body)."""
    return np.mean(self.features, axis=0)


def estimator() -> Estimator:
    return Estimator(fwd=None, m=SimpleNamespace(task="classify"), cfg=None, moving={}, dirs=None, head=True)


@pytest.mark.parametrize("shape", [(8, 24), (3, 1), (1, 2), (1, 1)])
def test_head_features_are_np_mean_bytes(shape):
    """2q = 2..12 forwards, over steps that reuse the buffer: ordinary values, values far apart in magnitude,
    and exact zeros of either sign (np.mean sums from +0, so a mean of -0s is +0). A single-element feature
    with 8 or more forwards is the case where np.mean sums pairwise: it is kept there."""
    rng = np.random.default_rng(5)
    est = estimator()
    for n in (2, 4, 6, 8, 12):
        for mode in range(3):
            fs = [rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 4))
                  for _ in range(n)]
            if mode == 1:
                fs = [f + np.float32(3e4) for f in fs]
            if mode == 2:
                fs = [np.where(rng.random(shape) < 0.5, np.float32(-0.0), np.float32(0.0)) for _ in range(n)]
            est.features[:] = fs
            got = est.head_features()
            want = reference_head_features(est)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), (n, mode)
    if shape != (1, 1):
        assert est._mean is not None and got is est._mean  # the in-place path ran (the buffer is reused)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_split(tmp_path_factory.mktemp("head"), 120, 40)


@pytest.mark.parametrize("q", [1, 3])
def test_head_lr_run_is_bit_identical_to_the_np_mean_run(tiny_bert_bundle, toy, tmp_path, monkeypatch, q):
    """A --head-lr run (ZO on the LoRA tensors, the head by its exact gradient from the mean features) gives the
    same adapter bytes, head included, and the same trajectory as the run that took np.mean of the stacked
    features. No --eval: keep-best would hand back the start when no step improves on it."""
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, eps=1e-2, perturbations=q, head_lr=0.3, head_init="none")
    new_out, ref_out = tmp_path / "new", tmp_path / "ref"
    train(tiny_bert_bundle, toy[0], new_out, cfg, log=quiet)
    monkeypatch.setattr(Estimator, "head_features", reference_head_features)
    train(tiny_bert_bundle, toy[0], ref_out, cfg, log=quiet)
    for name in (ADAPTER_FILE, "trajectory.npy"):
        assert (new_out / name).read_bytes() == (ref_out / name).read_bytes(), name
    doc = json.loads((new_out / "patch.json").read_text())
    assert doc["hyperparameters"]["head_lr"] == 0.3 and doc["steps"] == 8
    # the head's bytes do hang on the mean: a 1e-4 relative change of it gives another head
    monkeypatch.setattr(Estimator, "head_features", lambda self: reference_head_features(self) * np.float32(1.0001))
    train(tiny_bert_bundle, toy[0], tmp_path / "off", cfg, log=quiet)
    head, off = (load_tensors(out / "start.safetensors") for out in (new_out, tmp_path / "off"))
    assert head and all(head[k].tobytes() != off[k].tobytes() for k in head)
