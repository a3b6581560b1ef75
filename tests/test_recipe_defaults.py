"""The default recipe (issue 12): which runs get the exact-gradient head and its lr (round 3), the decoder's patience
(round 7) and its token budget per step (round 8)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime_helpers import write_toy_split
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.config import TrainConfig, resolve
from zoedge.runtime.evaluator import Dataset
from zoedge.runtime.memory import plan_token_batch
from zoedge.runtime.patch import ADAPTER_FILE, replay_patch
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import train


@pytest.fixture(scope="module")
def encoder(tiny_bert_bundle) -> Manifest:
    m = Manifest.load(tiny_bert_bundle)
    assert m.kind == "encoder" and "lora" in m.trainable_kinds and m.task == "classify"
    return m


def test_an_encoder_with_lora_trains_its_head_exactly_and_lora_at_the_larger_lr(encoder):
    cfg = resolve(TrainConfig(), encoder)
    assert (cfg.head_lr, cfg.lr) == (1e-3, 3e-3)
    assert (cfg.steps, cfg.lr_schedule) == (2000, "constant")


@pytest.mark.parametrize("given", [
    {"head_lr": 0.0},                      # asked for the head in ZO
    {"seed_pool": 16},                     # a seed-pool patch is ZO coefficients only
    {"roles": ["head"]},                   # nothing but the head: nothing left for ZO
])
def test_the_head_stays_in_zo_at_the_old_lr_where_asked_or_where_it_cannot_be_exact(encoder, given):
    cfg = resolve(TrainConfig(**given), encoder)
    assert (cfg.head_lr, cfg.lr) == (0.0, 1e-3)


def test_a_copies_bundle_keeps_the_head_in_zo(encoder):
    cfg = resolve(TrainConfig(), dataclasses.replace(encoder, copies=2))
    assert cfg.head_lr == 0.0 and cfg.batched


def test_explicit_settings_win(encoder):
    cfg = resolve(TrainConfig(head_lr=0.5, lr=1e-4), encoder)
    assert (cfg.head_lr, cfg.lr) == (0.5, 1e-4)
    assert resolve(TrainConfig(head_lr=0.5), encoder).lr == 3e-3  # the lr measured with an exact head


def test_a_decoder_with_lora_trains_its_head_exactly_at_its_own_smaller_lr(tiny_llama_bundle):
    m = Manifest.load(tiny_llama_bundle)
    assert m.kind == "decoder" and "lora" in m.trainable_kinds
    cfg = resolve(TrainConfig(), m)
    assert (cfg.head_lr, cfg.lr) == (1e-4, 3e-3)
    assert (cfg.steps, cfg.lr_schedule) == (1000, "constant")  # round 6's 500 decaying steps scored lower
    assert resolve(TrainConfig(lr_schedule="linear"), m).lr_schedule == "linear"
    assert resolve(TrainConfig(head_lr=0.0), m).lr == 3e-4  # the head in ZO: the decoder's old lr


def test_a_decoder_stops_after_three_evals_without_a_better_one_unless_told_otherwise(tiny_llama_bundle, encoder):
    """Round 7: every SmolLM2 seed kept step 200 or 300 and then diverged; patience 3 ends those runs at the kept
    tensors. The encoder keeps running its steps (its cells were measured without patience)."""
    m = Manifest.load(tiny_llama_bundle)
    assert resolve(TrainConfig(), m).patience == 3
    assert resolve(TrainConfig(patience=0), m).patience == 0
    assert resolve(TrainConfig(), encoder).patience == 0
    with pytest.raises(ZoedgeError, match="bad --patience"):
        resolve(TrainConfig(patience=-1), m)
    with pytest.raises(ZoedgeError, match="bad --min-gain-se"):
        resolve(TrainConfig(min_gain_se=float("nan")), m)


def test_patience_stops_the_run_and_the_patch_keeps_the_best(tiny_llama_bundle, tmp_path):
    """With --select accuracy and a step too small to change a prediction, no eval after step 0 is better: the
    run stops at eval_every x patience steps, and the patch is the start's tensors."""
    train_f, dev_f = write_toy_split(tmp_path, 40, 16)
    cfg = TrainConfig(steps=50, batch_size=4, lr=1e-12, head_lr=1e-12, head_init="none", select="accuracy",
                      eval_every=5, patience=2)
    messages: list[str] = []
    r = train(tiny_llama_bundle, train_f, tmp_path / "p", cfg, eval_path=dev_f, log=messages.append)
    assert r["steps_run"] == 10 and r["steps"] == 0
    assert any("early stop at step 10" in line for line in messages)


def test_the_token_budget_shrinks_the_batch_for_long_rows_only():
    logs: list[str] = []
    assert plan_token_batch([20] * 30, 16, 640, logs.append) == 16 and not logs  # SST-2-like phrases: unchanged
    assert plan_token_batch([128] * 40, 16, 640, logs.append) == 5  # reviews and articles at the 128-token cap
    assert "batch size 16 -> 5" in logs[-1] and "90th percentile 128 tokens" in logs[-1]
    assert plan_token_batch([10] * 19 + [500], 16, 640, logs.append) == 16  # one long outlier is not the width
    assert plan_token_batch([128] * 5, 16, 64, logs.append) == 1  # never below one example


def test_a_decoder_plans_its_batch_from_its_token_budget(tiny_llama_bundle, encoder, tmp_path):
    """The planned batch is the patch's batch_size (the trajectory replays with it); off for encoders."""
    m = Manifest.load(tiny_llama_bundle)
    assert resolve(TrainConfig(), m).step_tokens == 640 and resolve(TrainConfig(), encoder).step_tokens == 0
    with pytest.raises(ZoedgeError, match="bad --step-tokens"):
        resolve(TrainConfig(step_tokens=-5), m)
    train_f, _ = write_toy_split(tmp_path, 40, 16)
    cfg = TrainConfig(steps=3, batch_size=8, head_init="none", step_tokens=20)
    messages: list[str] = []
    train(tiny_llama_bundle, train_f, tmp_path / "p", cfg, log=messages.append)
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    width = sorted(len(r) for r in Dataset(
        [ln.split("\t")[0] for ln in train_f.read_text().splitlines()[1:]], None).rows(Bundle.open(tiny_llama_bundle).encoder))
    assert doc["hyperparameters"]["batch_size"] == max(1, 20 // int(np.percentile(width, 90))) < 8
    assert any("--step-tokens 20: batch size 8 ->" in line for line in messages)
    b = doc["hyperparameters"]["batch_size"]  # the lr scaled with the batch: every step's lr is lr * b / 8
    lrs = np.load(tmp_path / "p" / "trajectory.npy")[:, -1]
    assert np.array_equal(lrs, np.full(3, np.float32(resolve(cfg, m).lr * b / 8)))
    assert any(f"the lr scales with the batch: x{b / 8:.3g}" in line for line in messages)
    rebuilt = replay_patch(tmp_path / "p", tiny_llama_bundle)
    adapter = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    assert all(np.array_equal(adapter[k], rebuilt[k]) for k in adapter)
