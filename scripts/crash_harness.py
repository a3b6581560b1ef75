#!/usr/bin/env python
"""Crash-resume harness for `zoedge train` (issue 7).

SIGKILLs `python -m zoedge train` on a tiny-bert bundle at random moments -- random delays, the moment a
checkpoint temporary appears (`.checkpoint.safetensors.*`), the moment a patch file temporary appears
(`.adapter_model.safetensors.*`, `.trajectory.npy.*`, ...), or during start-up -- then runs the same
command line again (with `--resume`, as a supervisor's Restart= would) until it exits 0: `--resume` continues
a checkpoint and starts fresh when there is none yet. After every
kill it checks what a reader of --out would see:

  * patch.json present  => `zoedge.runtime.patch.read_patch` passes (every listed file matches its sha256)
  * checkpoint present  => `zoedge.runtime.checkpoint.load_checkpoint` loads it

and at the end of every run that the patch is bit-identical to an uninterrupted reference run
(adapter tensors, patch.json's adapter_sha256, trajectory.npy, start.safetensors).

    .venv/bin/python scripts/crash_harness.py --kills 50 --json
    .venv/bin/python scripts/crash_harness.py --kills 6 --steps 60      # quick

Exit status 0 when every run matched and no invariant broke; 1 otherwise. One heavy process at a time.
Stale temporaries left at the end of a run are counted (the trainer removes its own on every start). The
first run's command is run once more after it finished: it must exit 0 and rewrite nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CKPT_TMP = ".checkpoint.safetensors."
PATCH_TMPS = (".adapter_model.safetensors.", ".trajectory.npy.", ".start.safetensors.", ".patch.json.",
              ".adapter_config.json.")
MODES = ("random", "ckpt-write", "patch-write", "startup")


@dataclass
class Stats:
    runs: int = 0
    runs_matched: int = 0
    kills: int = 0  # SIGKILLs delivered to a live trainer
    kills_by_mode: dict = field(default_factory=lambda: {m: 0 for m in MODES})
    kills_mid_write: int = 0  # a temporary file existed right after the kill
    kills_mid_checkpoint_write: int = 0
    kills_mid_patch_write: int = 0
    kills_with_checkpoint: int = 0
    kills_with_patch_json: int = 0
    missed: int = 0  # the process finished before the planned kill
    resumes: int = 0
    fresh_restarts: int = 0
    stale_temps_seen_at_end: int = 0
    invariant_failures: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)
    cli_failures: list = field(default_factory=list)
    seconds: float = 0.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_cmd(bundle: Path, data: Path, evald: Path, out: Path, args, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "zoedge", "train", str(bundle), "--data", str(data), "--eval", str(evald),
           "--out", str(out), "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
           "--batch-size", "8", "--eval-every", str(max(1, args.steps // 4)), "--seed", "3", "--optimizer",
           "zo-momentum"]
    return cmd + (["--resume"] if resume else [])


def temps(out: Path) -> list[str]:
    try:
        return [n for n in os.listdir(out) if n.startswith(".")]
    except FileNotFoundError:
        return []


def fingerprint(out: Path) -> dict:
    from zoedge.manifest import sha256_file
    from zoedge.runtime.patch import ADAPTER_FILE, START_FILE, TRAJECTORY_FILE, read_patch
    from zoedge.runtime.tensors import load_tensors, tensor_digest

    doc = read_patch(out)
    return {"adapter_tensors": tensor_digest(load_tensors(out / ADAPTER_FILE)), "adapter_sha256": doc["adapter_sha256"],
            "trajectory": sha256_file(out / TRAJECTORY_FILE),
            "start": sha256_file(out / START_FILE) if (out / START_FILE).exists() else None,
            "steps": doc["steps"], "history": json.dumps(doc["metrics"]["history"], sort_keys=True)}


def check_invariants(out: Path) -> list[str]:
    """What a reader sees in --out right now (the trainer is dead)."""
    from zoedge.errors import ZoedgeError
    from zoedge.runtime.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from zoedge.runtime.patch import PATCH_FILE, read_patch

    problems = []
    if (out / PATCH_FILE).exists():
        try:
            read_patch(out)
        except (ZoedgeError, OSError, ValueError) as e:
            problems.append(f"half-written patch visible: {e}")
    if (out / CHECKPOINT_FILE).exists():
        try:
            load_checkpoint(out)
        except Exception as e:  # noqa: BLE001 - any failure is a broken checkpoint
            problems.append(f"unloadable checkpoint visible: {type(e).__name__}: {e}")
    return problems


def wait_for(proc: subprocess.Popen, out: Path, prefixes: tuple[str, ...], timeout: float, poll: float) -> bool:
    """Spin until a temporary with one of the prefixes exists in out (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with os.scandir(out) as it:
                if any(e.name.startswith(prefixes) for e in it):
                    return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def one_attempt(cmd: list[str], out: Path, mode: str | None, rng: random.Random, est: float,
                stats: Stats) -> subprocess.CompletedProcess | None:
    """Run the trainer; kill it per `mode` (None: let it finish). Returns the finished process or None if killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hit = True
        if mode == "random":
            time.sleep(rng.uniform(0.2, est))
        elif mode == "startup":
            time.sleep(rng.uniform(0.05, 1.0))
        elif mode == "ckpt-write":
            time.sleep(rng.uniform(0.0, est * 0.8))  # not always the first checkpoint
            hit = wait_for(proc, out, (CKPT_TMP,), est * 3, 0.0002)
            if hit and rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.004))  # somewhere inside the write / fsync / rename
        elif mode == "patch-write":
            hit = wait_for(proc, out, PATCH_TMPS, est * 4, 0.0001)
            if hit and rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.003))
        if mode is not None and hit and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stats.kills += 1
            stats.kills_by_mode[mode] += 1
            left = temps(out)
            if left:
                stats.kills_mid_write += 1
            if any(n.startswith(CKPT_TMP) for n in left):
                stats.kills_mid_checkpoint_write += 1
            if any(n.startswith(PATCH_TMPS) for n in left):
                stats.kills_mid_patch_write += 1
            stats.kills_with_checkpoint += (out / "checkpoint.safetensors").exists()
            stats.kills_with_patch_json += (out / "patch.json").exists()
            return None
        if mode is not None:
            stats.missed += 1
        stdout, stderr = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def run_one(run: int, bundle: Path, data: Path, evald: Path, work: Path, args, rng: random.Random, est: float,
            stats: Stats) -> dict | None:
    """One run driven as a supervisor drives it: the same command line (with --resume) after every kill, until
    it exits 0. --resume continues a checkpoint when there is one and starts fresh otherwise."""
    from zoedge.runtime.checkpoint import CHECKPOINT_FILE
    from zoedge.runtime.patch import PATCH_FILE

    out = work / f"run{run:03d}"
    cmd = train_cmd(bundle, data, evald, out, args, True)
    kills_planned = rng.randint(1, args.max_kills_per_run)
    for attempt in range(kills_planned + 6):
        mode = rng.choice(MODES) if attempt < kills_planned and stats.kills < args.kills else None
        if (out / CHECKPOINT_FILE).exists():
            stats.resumes += 1
        elif attempt:
            stats.fresh_restarts += 1
        p = one_attempt(cmd, out, mode, rng, est, stats)
        problems = check_invariants(out)
        if problems:
            stats.invariant_failures += [f"run {run} attempt {attempt} ({mode}): {x}" for x in problems]
        if p is None:
            continue
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            stats.cli_failures.append(f"run {run} attempt {attempt}: exit {p.returncode}: {last}")
            return None
        break
    if not ((out / PATCH_FILE).exists() and not (out / CHECKPOINT_FILE).exists()):
        stats.cli_failures.append(f"run {run}: did not finish")
        return None
    stats.stale_temps_seen_at_end += len(temps(out))
    got = fingerprint(out)
    if run == 1:  # the same command once more on a finished run: exit 0, nothing rewritten
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        if p.returncode != 0 or fingerprint(out) != got:
            stats.cli_failures.append(f"run {run}: re-running the finished command: exit {p.returncode}")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="stop after this many SIGKILLs (default 50)")
    ap.add_argument("--max-kills-per-run", type=int, default=5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="harness RNG seed (kill timing)")
    ap.add_argument("--bundle", type=Path, help="tiny-bert bundle (default: export one into the work dir)")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="print the stats as one JSON line")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from runtime_helpers import write_sentiment

    t0 = time.monotonic()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="zoedge-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    stats = Stats()
    try:
        bundle = args.bundle
        if bundle is None:
            from conftest import export_tiny

            bundle = work / "tiny-bert"
            if not (bundle / "manifest.json").exists():
                export_tiny(bundle, "tiny-bert")
        data = write_sentiment(work / "train.tsv", 200)
        evald = write_sentiment(work / "eval.tsv", 32, seed=1)
        ref = work / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        t = time.monotonic()
        p = subprocess.run(train_cmd(bundle, data, evald, ref, args, False), cwd=REPO, capture_output=True,
                           text=True, timeout=900)
        est = time.monotonic() - t
        if p.returncode != 0:
            log(p.stderr)
            return 1
        want = fingerprint(ref)
        log(f"reference run: {est:.2f}s, adapter {want['adapter_sha256'][:12]}")
        run = 0
        while stats.kills < args.kills and run < 10 * args.kills:
            run += 1
            stats.runs += 1
            got = run_one(run, bundle, data, evald, work, args, rng, est, stats)
            if got is not None and got == want:
                stats.runs_matched += 1
            elif got is not None:
                stats.mismatches.append({"run": run, **{k: (got[k], want[k]) for k in got if got[k] != want[k]}})
            log(f"run {run}: kills so far {stats.kills}, matched {stats.runs_matched}/{stats.runs}")
    finally:
        stats.seconds = round(time.monotonic() - t0, 1)
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = (not stats.invariant_failures and not stats.mismatches and not stats.cli_failures
          and stats.runs_matched == stats.runs)
    if args.json:
        print(json.dumps({"ok": ok, **asdict(stats)}))
    else:
        for k, v in asdict(stats).items():
            print(f"{k}: {v}")
        print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
