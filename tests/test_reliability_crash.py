"""Crash safety of `zoedge train` (issue 7): SIGKILL at random points and resume (scripts/crash_harness.py), disk
full and a read-only --out, NaN injection into the divergence guard.

The default run does a bounded harness (6 kills); `make test-reliability` runs 50+ (marked slow).
Disk-full / read-only tests need root (tmpfs / bind mounts) and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from runtime_helpers import write_sentiment

sys.path.insert(0, str(REPO / "scripts"))



def _harness(bundle: Path, kills: int, steps: int, seed: int) -> dict:
    import json

    p = subprocess.run([sys.executable, str(REPO / "scripts" / "crash_harness.py"), "--kills", str(kills), "--steps",
                        str(steps), "--bundle", str(bundle), "--seed", str(seed), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert p.stdout.strip(), p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_crash_resume_bounded(tiny_bert_bundle):
    r = _harness(tiny_bert_bundle, kills=6, steps=60, seed=1)
    assert r["ok"], r
    assert r["kills"] >= 6 and r["runs_matched"] == r["runs"] >= 1


@pytest.mark.slow
def test_crash_resume_fifty_kills(tiny_bert_bundle):
    r = _harness(tiny_bert_bundle, kills=50, steps=120, seed=0)
    assert r["ok"], r
    assert r["kills"] >= 50 and r["kills_mid_checkpoint_write"] >= 1 and r["kills_mid_patch_write"] >= 1


def _kill_mid_checkpoint(bundle: Path, data: Path, out: Path) -> None:
    """Run until a checkpoint temporary exists, SIGKILL, and return with it left in out."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "zoedge", "train", str(bundle), "--data", str(data), "--out",
                             str(out), "--steps", "100000", "--checkpoint-every", "1", "--batch-size", "4"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.is_dir() and any(n.startswith(".checkpoint.safetensors.") for n in os.listdir(out)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0002)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kill_mid_checkpoint_leaves_no_stale_temporaries(tiny_bert_bundle, tmp_path):
    data = write_sentiment(tmp_path / "d.tsv", 40)
    out = tmp_path / "out"
    for _ in range(20):  # until the kill lands while the temporary exists
        shutil.rmtree(out, ignore_errors=True)
        _kill_mid_checkpoint(tiny_bert_bundle, data, out)
        if any(n.startswith(".") for n in os.listdir(out)):
            break
    assert any(n.startswith(".") for n in os.listdir(out)), "could not land a kill inside a checkpoint write"
    if (out / "checkpoint.safetensors").exists():
        p = run_cli("train", tiny_bert_bundle, "--data", data, "--out", out, "--steps", "100000", "--checkpoint-every",
                    "1", "--batch-size", "4", "--resume", "--steps", "3")  # different settings: refused, fine
        (out / "checkpoint.safetensors").unlink()  # the run is abandoned: a fresh start must work
    p = run_cli("train", tiny_bert_bundle, "--data", data, "--out", out, "--steps", "2", "--batch-size", "4")
    assert p.returncode == 0, p.stderr[-500:]
    assert not [n for n in os.listdir(out) if n.startswith(".")]


# ---- disk full / read-only ---------------------------------------------------------------------------------
def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and \
        subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture()
def small_tmpfs(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=32k", "tmpfs", str(d)):
        pytest.skip("needs root and tmpfs mounts")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tiny_bert_bundle, tmp_path, small_tmpfs):
    data = write_sentiment(tmp_path / "d.tsv", 40)
    out = small_tmpfs / "p"
    p = run_cli("train", tiny_bert_bundle, "--data", data, "--out", out, "--steps", "40", "--checkpoint-every", "3",
                "--batch-size", "4")
    assert (out / "checkpoint.safetensors").exists()  # one ~20 KB checkpoint fits in 32 KB, a second beside it (atomic write) does not
    from zoedge.runtime.checkpoint import load_checkpoint

    load_checkpoint(out)  # the last good checkpoint is intact
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("zoedge: error:"), p.stderr[-800:]


def test_read_only_out_is_one_line_and_keeps_the_checkpoint(tiny_bert_bundle, tmp_path):
    from zoedge.runtime.checkpoint import load_checkpoint
    from zoedge.runtime.trainer import TrainConfig
    from zoedge.runtime.trainer import train

    data = write_sentiment(tmp_path / "d.tsv", 40)
    out = tmp_path / "ro"

    def stop(rec):
        if rec["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_bert_bundle, data, out, TrainConfig(steps=8, batch_size=4, checkpoint_every=2), on_step=stop,
              log=lambda *_: None)
    before = (out / "checkpoint.safetensors").read_bytes()
    if not (_mount("--bind", str(out), str(out)) and _mount("-o", "remount,ro,bind", str(out))):
        subprocess.run(["umount", str(out)], capture_output=True)
        pytest.skip("needs root and bind mounts")
    try:
        p = run_cli("train", tiny_bert_bundle, "--data", data, "--out", out, "--steps", "8", "--checkpoint-every", "2",
                    "--batch-size", "4", "--resume")
    finally:
        subprocess.run(["umount", str(out)], check=True)
    assert (out / "checkpoint.safetensors").read_bytes() == before
    load_checkpoint(out)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("zoedge: error:"), p.stderr[-800:]


# ---- training numerics -----------------------------------------------------------------------------------------
def test_nan_loss_mid_run_rolls_back_and_finishes(tiny_bert_bundle, tmp_path, monkeypatch):
    """The objective returns NaN at steps 7 and 8 and +inf at 13 (as if the forward blew up): the guard rolls back,
    halves the lr, logs it, and the run completes with finite tensors."""
    from zoedge.runtime import objectives, trainer
    from zoedge.runtime.patch import ADAPTER_FILE
    from zoedge.runtime.tensors import load_tensors

    calls = {"n": 0}
    real = objectives.classification_loss

    def flaky(objective, logits, y):
        calls["n"] += 1
        if calls["n"] in (13, 15):  # the + forwards of the 7th and 8th loop iterations
            return float("nan")
        if calls["n"] == 26:
            return float("inf")
        return real(objective, logits, y)

    monkeypatch.setattr(objectives, "classification_loss", flaky)
    data = write_sentiment(tmp_path / "d.tsv", 60)
    messages: list[str] = []
    r = trainer.train(tiny_bert_bundle, data, tmp_path / "p", trainer.TrainConfig(steps=20, batch_size=4,
                      checkpoint_every=5, keep="last", head_init="none"), log=messages.append)
    assert r["steps_run"] == 20 and r["rollbacks"] >= 2
    assert sum("divergence guard" in m for m in messages) == r["rollbacks"]
    assert all(np.isfinite(v).all() for v in load_tensors(tmp_path / "p" / ADAPTER_FILE).values())
    traj = np.load(tmp_path / "p" / "trajectory.npy")
    assert traj.shape == (20, 2) and np.isfinite(traj).all() and traj[:, 1].min() < traj[0, 1]


def test_nan_trainables_mid_run_roll_back(tiny_bert_bundle, tmp_path, monkeypatch):
    """A bad update poisons the trainable tensors with NaN at step 9: the next step's losses are NaN, the guard
    restores the last snapshot (not the poisoned arrays), and the patch is finite."""
    from zoedge.runtime import loop, trainer
    from zoedge.runtime.patch import ADAPTER_FILE
    from zoedge.runtime.tensors import load_tensors

    real_update = loop.update
    seen = {"poisoned": False}

    def poisoning_update(tensors, opt, cfg, roles, dirs, run_seed, step, grads, lr):
        real_update(tensors, opt, cfg, roles, dirs, run_seed, step, grads, lr)
        if step == 9 and not seen["poisoned"]:
            seen["poisoned"] = True
            for v in tensors.values():
                v[...] = np.nan

    monkeypatch.setattr(loop, "update", poisoning_update)
    data = write_sentiment(tmp_path / "d.tsv", 60)
    messages: list[str] = []
    r = trainer.train(tiny_bert_bundle, data, tmp_path / "p", trainer.TrainConfig(steps=16, batch_size=4,
                      checkpoint_every=4, keep="last", head_init="none"), log=messages.append)
    assert seen["poisoned"] and r["rollbacks"] >= 1 and r["steps_run"] == 16
    assert any("divergence guard" in m for m in messages)
    assert all(np.isfinite(v).all() for v in load_tensors(tmp_path / "p" / ADAPTER_FILE).values())


def test_exploding_projected_gradient_is_clipped_or_rolled_back(tiny_bert_bundle, tmp_path):
    """A huge lr makes the loss explode; with --clip the projected gradient stays bounded; the run finishes."""
    from zoedge.runtime import trainer

    data = write_sentiment(tmp_path / "d.tsv", 60)
    messages: list[str] = []
    from zoedge.errors import ZoedgeError

    try:
        r = trainer.train(tiny_bert_bundle, data, tmp_path / "p", trainer.TrainConfig(steps=30, batch_size=4, lr=2.0,
                          clip=5.0, checkpoint_every=5, keep="last", head_init="none"), log=messages.append)
    except ZoedgeError as e:  # the guard's documented way out: one clear error after 12 rollbacks in a row
        assert "diverged" in str(e) and sum("divergence guard" in m for m in messages) > 12
        return
    traj = np.load(tmp_path / "p" / "trajectory.npy")
    assert r["steps_run"] == 30 and np.abs(traj[:, 0]).max() <= 5.0 and np.isfinite(traj).all()
