"""Training you can trust (issue 13): one RunState that rollback and resume restore whole, a guard that holds,
--resume as a fixed command line, and corrupt checkpoints refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, run_cli
from runtime_helpers import kill_cli_when, quiet, write_toy_split
from zoedge.constants import LR_CUT_FLOOR, TENSOR_ABS_LIMIT
from zoedge.errors import ZoedgeError
from zoedge.runtime import loop, objectives
from zoedge.runtime.checkpoint import CHECKPOINT_FILE
from zoedge.runtime.patch import ADAPTER_FILE, replay_patch
from zoedge.runtime.state import GUARD_FIELDS, RunState
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_split(tmp_path_factory.mktemp("trust"), 200, 60)


def max_abs(tensors) -> float:
    return max(float(np.abs(v).max()) for v in tensors.values())


# ---- one run state ----------------------------------------------------------------------------------------------
def test_restore_brings_back_every_field_but_the_guards_own():
    live = np.zeros(3, np.float32)
    s = RunState(bundle_id="b", config={}, tensors={"a": live}, trajectory=np.zeros((5, 2), np.float32))
    s.step, s.best_step, s.best_score, s.evals_since_best, s.history = 2, 2, 0.7, 0, [{"step": 2}]
    s.trajectory[:2] = 1.0
    s.optimizer["m_a"] = np.ones(3, np.float32)
    snap = s.snapshot()
    live += 5.0
    s.optimizer["m_a"] += 1.0
    s.step, s.best_step, s.best_score, s.evals_since_best = 4, 4, 0.9, 3
    s.history.append({"step": 4})
    s.trajectory[2:4] = 2.0
    s.best = {"a": live.copy()}
    s.lr_scale, s.rollbacks = 0.25, 3
    opt_dict = s.optimizer
    s.restore(snap)
    assert s.tensors["a"] is live and np.array_equal(live, np.zeros(3))  # in place: the engine's binding holds
    assert s.optimizer is opt_dict and np.array_equal(s.optimizer["m_a"], np.ones(3))
    assert (s.step, s.best_step, s.best_score, s.evals_since_best, s.history) == (2, 2, 0.7, 0, [{"step": 2}])
    assert s.best == {} and np.array_equal(s.trajectory[2:], np.zeros((3, 2)))
    assert (s.lr_scale, s.rollbacks) == (0.25, 3) and "lr_scale" in GUARD_FIELDS


def test_a_rollback_after_a_best_keeps_the_patch_replayable(tiny_bert_bundle, toy, tmp_path, monkeypatch):
    """Issue 13, case 4: a best eval at step b, then a NaN loss a few steps later. On main the rollback went to an
    older snapshot but kept best / best_step, so the patch's trajectory[:b] no longer rebuilt its adapter. Here a
    first run finds b; the second run gets a NaN at step b + 3, rolls back to b itself, and keep=best gives a patch
    whose trajectory replays bit-exactly to its adapter."""
    cfg = TrainConfig(steps=40, batch_size=8, lr=2e-2, eps=1e-2, head_init="none", eval_every=5, checkpoint_every=0)
    first = train(tiny_bert_bundle, toy[0], tmp_path / "first", cfg, eval_path=toy[1], log=quiet)
    start = first["history"][0]["eval_loss"]  # keep-best selects on eval loss: b is the first new best
    b = next(h["step"] for h in first["history"] if h["step"] > 0 and h["eval_loss"] < start)
    assert b + 3 < 40, first["history"]
    calls = {"n": 0}
    real = objectives.classification_loss

    def flaky(objective, logits, y):
        calls["n"] += 1  # step k's + forward is call 2k - 1 until the first rollback
        return float("nan") if calls["n"] == 2 * (b + 3) - 1 else real(objective, logits, y)

    monkeypatch.setattr(objectives, "classification_loss", flaky)
    messages: list[str] = []
    r = train(tiny_bert_bundle, toy[0], tmp_path / "p", cfg, eval_path=toy[1], log=messages.append)
    assert r["rollbacks"] == 1 and any(f"at step {b + 3}; rolled back to step {b}," in m for m in messages), messages
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert doc["steps"] >= b > 0
    adapter = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    rebuilt = replay_patch(tmp_path / "p", tiny_bert_bundle)
    assert all(np.array_equal(adapter[k], rebuilt[k]) for k in adapter)


# ---- a guard that holds -----------------------------------------------------------------------------------------
def test_a_huge_lr_never_ends_in_an_exploded_patch(tiny_bert_bundle, toy, tmp_path):
    """--lr 1e8 (issue 13, case 1 put on tiny-bert; main kept an adapter with values up to 2.2e10): the guard keeps
    cutting the lr until steps stay bounded, or stops with its one-line error. Never an exploded patch, exit 0."""
    out = tmp_path / "p"
    p = run_cli("train", tiny_bert_bundle, "--data", toy[0], "--eval", toy[1], "--steps", "40", "--eval-every", "10",
                "--lr", "1e8", "--keep", "last", "--out", out, "--json")
    if p.returncode != 0:
        assert p.stderr.strip().splitlines()[-1].startswith("zoedge: error: training diverged"), p.stderr[-600:]
        assert not (out / "patch.json").exists()
        return
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["rollbacks"] >= 1  # all 40 steps, or stopped where the lr it took was cut below LR_CUT_FLOOR
    assert r["steps_run"] == 40 or ("stopping at step" in p.stderr and r["steps_run"] < 40), p.stderr[-600:]
    assert max_abs(load_tensors(out / ADAPTER_FILE)) < TENSOR_ABS_LIMIT
    lrs = np.load(out / "trajectory.npy")[:, -1]
    assert np.all(np.isfinite(lrs)) and lrs.max() < 1e8


def test_repeated_blowups_end_in_an_error_that_names_the_step_size(tiny_bert_bundle, toy, tmp_path, monkeypatch):
    """Every update explodes the tensors, however small the lr: after MAX_FAILED_ROLLBACKS rollbacks in a row the
    run stops with one line that blames the step size, and writes no patch."""
    real_update = loop.update

    def exploding(tensors, *a, **k):
        real_update(tensors, *a, **k)
        next(iter(tensors.values()))[0] = 1e9

    monkeypatch.setattr(loop, "update", exploding)
    with pytest.raises(ZoedgeError, match="step size is too large"):
        train(tiny_bert_bundle, toy[0], tmp_path / "p", TrainConfig(steps=10, batch_size=4, head_init="none"), log=quiet)
    assert not (tmp_path / "p" / "patch.json").exists()


def test_a_run_that_recovers_only_at_a_tiny_lr_stops_there(tiny_bert_bundle, toy, tmp_path, monkeypatch):
    """The guard's cuts compound and are never undone: one blow-up every 7 steps, each cured by one rollback, halves
    the lr ten times. Before LR_CUT_FLOOR the run went on to its last step with steps that moved nothing (SmolLM2
    Drugs.com: lr 1e-33, MiniLM BBC: 0); here it stops at the first step it gets past below the floor, and the
    patch (keep last) is the verified state there, which replays bit-exactly."""
    real_update, seen = loop.update, set()

    def blow_up_once_per_7(tensors, opt, zo_cfg, roles, dirs, seed, step, grads, lr):
        real_update(tensors, opt, zo_cfg, roles, dirs, seed, step, grads, lr)
        if step % 7 == 0 and step not in seen:
            seen.add(step)
            next(iter(tensors.values()))[0] = 1e9

    monkeypatch.setattr(loop, "update", blow_up_once_per_7)
    messages: list[str] = []
    cfg = TrainConfig(steps=200, batch_size=4, lr=1e-2, head_init="none", keep="last", checkpoint_every=0)
    r = train(tiny_bert_bundle, toy[0], tmp_path / "p", cfg, log=messages.append)
    cuts = int(np.ceil(np.log(1 / LR_CUT_FLOOR) / np.log(2)))  # one halving per rollback: 10 below 1e-3
    assert r["rollbacks"] == cuts and r["steps_run"] == 7 * cuts + 1 < 200, (r["rollbacks"], r["steps_run"])
    assert any("stopping at step" in m and "no longer move the tensors" in m for m in messages), messages
    lrs = np.load(tmp_path / "p" / "trajectory.npy")[:, -1]
    assert lrs[-1] == np.float32(cfg.lr * 0.5 ** cuts) < LR_CUT_FLOOR * cfg.lr  # the steps since the last rollback
    adapter = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    rebuilt = replay_patch(tmp_path / "p", tiny_bert_bundle)
    assert all(np.array_equal(adapter[k], rebuilt[k]) for k in adapter)


def test_nan_in_a_resumed_checkpoint_is_refused(tiny_bert_bundle, toy, tmp_path):
    """Issue 13, case 3: NaN in 10 values of a query and of a value lora_B in checkpoint.safetensors; main resumed
    and wrote the NaN into the patch (or rolled back 12 times to the corrupted state and blamed --lr)."""
    out = tmp_path / "p"

    def stop(rec):
        if rec["step"] == 6:
            raise KeyboardInterrupt

    cfg = TrainConfig(steps=12, batch_size=4, checkpoint_every=3, head_init="none")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_bert_bundle, toy[0], out, cfg, on_step=stop, log=quiet)
    pristine = (out / CHECKPOINT_FILE).read_bytes()
    for which in ("query", "value"):
        (out / CHECKPOINT_FILE).write_bytes(pristine)
        flat = load_file(str(out / CHECKPOINT_FILE))
        from safetensors import safe_open

        with safe_open(str(out / CHECKPOINT_FILE), framework="numpy") as f:
            meta = f.metadata()
        key = next(k for k in flat if k.startswith("t/") and f"{which}.lora_B" in k)
        flat[key].reshape(-1)[:10] = np.nan
        save_file(flat, str(out / CHECKPOINT_FILE), metadata=meta)
        p = run_cli("train", tiny_bert_bundle, "--data", toy[0], "--out", out, "--steps", "12", "--batch-size", "4",
                    "--checkpoint-every", "3", "--head-init", "none", "--resume")
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "holds NaN or Inf" in last and "corrupt" in last, p.stderr[-600:]
        assert not (out / "patch.json").exists()


# ---- --resume as a fixed command line -------------------------------------------------------------------------
def test_resume_on_a_first_start_starts_fresh(tiny_bert_bundle, toy, tmp_path):
    out = tmp_path / "p"
    args = ["train", tiny_bert_bundle, "--data", toy[0], "--out", out, "--steps", "5", "--batch-size", "4", "--resume"]
    p = run_cli(*args, check=True)
    assert "starting fresh" in p.stderr + p.stdout and (out / "patch.json").exists()
    before = (out / "patch.json").read_bytes()
    p = run_cli(*args, check=True)  # the job is restarted after it finished: nothing to do, exit 0
    assert "already holds the finished patch" in p.stderr + p.stdout and (out / "patch.json").read_bytes() == before
    p = run_cli(*args[:-5], "--steps", "6", "--batch-size", "4", "--resume")
    assert p.returncode == 2 and "other settings" in p.stderr


def test_sigkill_before_the_first_checkpoint_then_the_same_command(tiny_bert_bundle, toy, tmp_path):
    args = ["train", tiny_bert_bundle, "--data", toy[0], "--eval", toy[1], "--steps", "30", "--batch-size", "4",
            "--checkpoint-every", "10", "--resume", "--json"]
    ref = tmp_path / "ref"
    run_cli(*args, "--out", ref, check=True)
    out = tmp_path / "killed"
    # --out is created right before the first checkpoint is written
    assert kill_cli_when([*args, "--out", out], out.is_dir, REPO) and not (out / "patch.json").exists()
    run_cli(*args, "--out", out, check=True)
    a, b = load_tensors(ref / ADAPTER_FILE), load_tensors(out / ADAPTER_FILE)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not (out / CHECKPOINT_FILE).exists()


# ---- the head by its exact gradient (issue 12's "forward-only does not mean ZO everywhere") ------------------
def test_exact_head_step_matches_finite_differences():
    from zoedge.runtime.head_grad import ce_head_step

    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(12, 5)).astype(np.float32), rng.integers(0, 3, 12)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)

    def loss(w_, b_):
        return objectives.cross_entropy(f.astype(np.float64) @ w_.T + b_, y)

    w1, b1 = w.copy(), b.copy()
    l0 = ce_head_step(f, y, w1, b1, lr=1.0)
    assert abs(l0 - loss(w.astype(np.float64), b.astype(np.float64))) < 1e-9
    h = 1e-6
    for i, j in [(0, 0), (2, 4), (1, 3)]:
        wp, wm = w.astype(np.float64), w.astype(np.float64)
        wp[i, j] += h
        wm[i, j] -= h
        numeric = (loss(wp, b) - loss(wm, b)) / (2 * h)
        assert abs((w[i, j] - w1[i, j]) - numeric) < 1e-4  # lr 1: the step is the gradient
    assert loss(w1.astype(np.float64), b1.astype(np.float64)) < l0


def test_exact_head_mode_replays_bit_exactly(tiny_bert_bundle, toy, tmp_path):
    """ZO moves only the LoRA tensors; the head (trained by its exact gradient) travels in start.safetensors, so
    the trajectory still rebuilds the adapter bit-exactly."""
    out = tmp_path / "p"
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, eps=1e-2, head_init="lp", head_lr=0.3, eval_every=10)
    r = train(tiny_bert_bundle, toy[0], out, cfg, eval_path=toy[1], log=quiet)
    doc = json.loads((out / "patch.json").read_text())
    assert doc["hyperparameters"]["head_lr"] == 0.3 and "head" not in doc["zo"]["roles"]
    adapter, start = load_tensors(out / ADAPTER_FILE), load_tensors(out / "start.safetensors")
    rebuilt = replay_patch(out, tiny_bert_bundle)
    assert all(np.array_equal(adapter[k], rebuilt[k]) for k in adapter)
    assert start and all(np.array_equal(start[k], adapter[k]) for k in start)
    assert r["steps_run"] == 30


def test_a_finite_blowup_seen_three_times_at_one_step_is_a_hard_batch():
    """The guard's hard-batch rule (docs/device.md): a finite blow-up is a divergence until it has been seen
    HARD_BATCH_RETRIES times at the same step; NaN never is a hard batch."""
    from zoedge.constants import HARD_BATCH_RETRIES
    from zoedge.runtime.guard import NONFINITE_LOSS, loss_problem

    s = RunState(bundle_id="b", config={}, tensors={}, trajectory=np.zeros((10, 2), np.float32))
    s.step, s.loss_floor = 4, 0.5
    assert loss_problem([9.0, 9.5], [1.0], s, "ce")  # 9 > 3 * 0.5 + 1
    assert loss_problem([2.0, 2.4], [1.0], s, "ce") is None
    assert loss_problem([9.0, 9.5], [1.0], s, "accuracy") is None  # bounded objectives: only NaN counts
    s.fail_step, s.fail_count = 5, HARD_BATCH_RETRIES - 1
    assert loss_problem([9.0, 9.5], [1.0], s, "ce")
    s.fail_count = HARD_BATCH_RETRIES
    assert loss_problem([9.0, 9.5], [1.0], s, "ce") is None
    assert loss_problem([float("nan"), 1.0], [1.0], s, "ce") == NONFINITE_LOSS
