"""`zoedge agent`: the long-running device loop. Each cycle:

1. send what the outbox holds (patches queued while offline, or before their bundle was published);
2. pull the bundle if it is not there yet, and the newest global patch of the bundle when it is new;
3. when the labelled local data (a watched folder or file) has changed since the last run: train on all of it
   within the time (`train_seconds`) and memory (`[train] max_memory`) budget, starting from the newest global
   patch (zoedge.device.rebase), and push the result (trajectory format by default);
4. sleep `interval` seconds.

Safe to SIGKILL at any moment: every run lives in `state_dir/runs/<global>-<data digest>/` and is trained with
`resume=True` (a checkpoint continues, a finished patch is not redone, nothing starts fresh twice), pulls and derived
bundles appear by rename, pushes are idempotent (the server keeps one copy per archive). A run that exceeds its time
budget stops at a step and continues from its checkpoint in the next cycle. One process per state directory (a lock
file), and never two trainings at once across agents that share `train_lock`. One JSON line per event on stdout;
the current state in `state_dir/status.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

from zoedge.device.agent_config import AgentConfig
from zoedge.device.client import FleetClient, FleetError
from zoedge.device.outbox import Outbox
from zoedge.device.rebase import derive_bundle, rebase_patch
from zoedge.errors import ZoedgeError
from zoedge.fsio import write_bytes_atomic, write_json_atomic
from zoedge.manifest import MANIFEST_FILE, Manifest, sha256_file
from zoedge.patchdoc import PATCH_FILE
from zoedge.runtime.data import read_examples

DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
STATUS_FILE = "status.json"


class Pause(Exception):
    """The run stops at a step (time budget, or the agent is asked to stop); its checkpoint resumes it."""


class Agent:
    def __init__(self, cfg: AgentConfig, out: IO[str] | None = None):
        self.cfg, self.out = cfg, out or sys.stdout
        self.state = cfg.state_dir
        self.stopping = False
        self.status: dict[str, Any] = {"runs": {}}
        self._lock_file = None

    # ---- events and status ---------------------------------------------------------------------------------
    def event(self, name: str, **fields: Any) -> None:
        self.out.write(json.dumps({"ts": round(time.time(), 3), "event": name, **fields}, default=str) + "\n")
        self.out.flush()

    def set_status(self, **changes: Any) -> None:
        self.status.update(changes, pid=os.getpid(), updated=round(time.time(), 3))
        write_json_atomic(self.state / STATUS_FILE, self.status)

    def _load_status(self) -> None:
        try:
            self.status = json.loads((self.state / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.status = {}
        self.status.setdefault("runs", {})

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self, cycles: int = 0) -> None:
        """Cycle until stopped (SIGTERM / SIGINT) or, with cycles > 0, that many times."""
        self.state.mkdir(parents=True, exist_ok=True)
        self._hold_lock()
        self._load_status()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask_stop)
        self.event("start", pid=os.getpid(), config=str(self.cfg.source), state_dir=str(self.state))
        done = 0
        while not self.stopping:
            done += 1
            self.set_status(state="cycle", cycle=self.status.get("cycle", 0) + 1)
            try:
                self.cycle()
            except (ZoedgeError, OSError) as e:
                self.event("error", error=str(e))
                self.set_status(last_error=str(e))
            if cycles and done >= cycles:
                break
            self.set_status(state="sleeping")
            self.event("sleep", seconds=self.cfg.interval)
            self._sleep(self.cfg.interval)
        self.set_status(state="stopped")
        self.event("stop", cycles=done)

    def _ask_stop(self, *_: Any) -> None:
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def _hold_lock(self) -> None:
        f = open(self.state / "agent.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ZoedgeError(f"another zoedge agent is running on {self.state} (agent.lock is held)") from None
        self._lock_file = f  # held for the life of the process; the kernel drops it on any exit, SIGKILL too

    def cycle(self) -> None:
        with FleetClient(self.cfg.server, self.cfg.read_token(), retries=2, backoff=1.0) as client:
            self.sync(client)
            bundle_id = self.ensure_bundle(client)
            self.pull_global(client, bundle_id)
            self.maybe_train(client)

    # ---- the steps ---------------------------------------------------------------------------------------------
    def outbox(self) -> Outbox:
        return Outbox(self.state / "outbox")

    def sync(self, client: FleetClient) -> None:
        box = self.outbox()
        if not box.entries():
            return
        r = client.sync(box)
        self.event("sync", sent=[p["patch_id"] for p in r.sent], failed=[msg for _, msg in r.failed],
                   queued=len(box.entries()))

    def ensure_bundle(self, client: FleetClient) -> str:
        if not (self.cfg.bundle / MANIFEST_FILE).is_file():
            if not self.cfg.bundle_id:
                raise ZoedgeError(f"{self.cfg.bundle}: no bundle there and no bundle_id to pull it by")
            meta = client.pull_bundle(self.cfg.bundle_id, self.cfg.bundle)
            self.event("pulled_bundle", bundle_id=meta["bundle_id"], bytes=meta["bytes"])
        return Manifest.load(self.cfg.bundle).bundle_id

    def pull_global(self, client: FleetClient, bundle_id: str) -> None:
        root = self.state / "global"
        _remove_temporaries(root)
        g = client.latest_global(bundle_id)
        current = self.status.get("global") or {}
        if g is None or g["version"] <= current.get("version", -1) and (root / current.get("patch_id", "?")).is_dir():
            return
        dest = root / g["patch_id"]
        if not (dest / PATCH_FILE).is_file():  # a seed-pool fleet's device rebuilds it: the coefficients suffice
            client.pull(g["patch_id"], dest, "coefficients" if self.cfg.train.get("seed_pool") else None)
        self.set_status(**{"global": {"patch_id": g["patch_id"], "version": g["version"]}})
        self.event("pulled_global", patch_id=g["patch_id"], version=g["version"])

    def data_files(self) -> list[Path]:
        d = self.cfg.data
        if d.is_dir():
            return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                          and not p.name.startswith("."))
        return [d] if d.is_file() else []

    def maybe_train(self, client: FleetClient) -> None:
        files = self.data_files()
        if not files:
            self.event("no_data", data=str(self.cfg.data))
            return
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\0".encode())
        digest = h.hexdigest()
        g = self.status.get("global") or {}
        run_id = f"{(g.get('patch_id') or 'bundle')[:12]}-{digest[:12]}"
        if self.status["runs"].get(run_id) in ("pushed", "queued", "rejected"):
            return  # nothing new
        if self.status.get("trained_data") == digest and self.status["runs"].get(run_id) is None:
            return  # only the global is new: retrain when new data arrives
        run = self.state / "runs" / run_id
        data = run / "train.jsonl"
        if not data.is_file():
            rows = []
            for f in files:
                ex = read_examples(f, need_labels=True)
                rows += [json.dumps({"sentence": t, "label": lab}) for t, lab in zip(ex.texts, ex.labels)]
            if len(rows) < self.cfg.min_examples:
                self.event("too_few_examples", examples=len(rows), min_examples=self.cfg.min_examples)
                return
            run.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(data, ("\n".join(rows) + "\n").encode())
        with self.train_lock() as free:
            if not free:
                self.event("train_busy", lock=str(self.cfg.lock_path))
                return
            patch = self.train(run, data, g.get("patch_id"))
        if patch is not None:
            self.push(client, run_id, patch, digest)

    @contextlib.contextmanager
    def train_lock(self) -> Iterator[bool]:
        path = self.cfg.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def train(self, run: Path, data: Path, global_id: str | None) -> Path | None:
        """Train (or resume, or find finished) the run; the patch to push, or None when it paused."""
        from zoedge.runtime.loop import train

        overrides: dict[str, Any] = {}
        bundle = self.cfg.bundle
        rebase = bool(global_id) and not self.cfg.train.get("seed_pool")
        if global_id and not rebase:  # a seed-pool fleet: continue the global's coefficient vector on the bundle
            overrides.update(seed_pool_from=str(self.state / "global" / global_id), head_init="none")
        elif global_id:
            bundle = derive_bundle(self.cfg.bundle, self.state / "global" / global_id, self.state / "derived" / global_id)
            overrides.setdefault("head_init", "none")  # refine the shared head rather than refit it
        overrides.update(self.cfg.train)
        overrides.setdefault("checkpoint_every", 10)
        cfg = self.cfg.train_config(**overrides)
        budget = self.cfg.train_seconds
        t0 = time.monotonic()

        def on_step(rec: dict) -> None:
            if "eval_accuracy" in rec:
                self.event("train_eval", step=rec["step"], total=rec["total"], eval_accuracy=rec["eval_accuracy"])
            if self.stopping or (budget and time.monotonic() - t0 > budget):
                raise Pause(f"at step {rec['step']} of {rec['total']}")

        self.set_status(state="training", run=run.name)
        self.event("train_start", run=run.name, bundle=str(bundle), global_patch=global_id)
        try:
            result = train(bundle, data, run / "patch", cfg, eval_path=self.cfg.eval, resume=True, on_step=on_step,
                           log=lambda msg: self.event("train_log", run=run.name, msg=msg))
        except Pause as p:
            self.status["runs"][run.name] = "paused"
            self.set_status(state="paused")
            self.event("train_paused", run=run.name, why="stop requested" if self.stopping else "time budget",
                       where=str(p))
            return None
        summary = {k: result.get(k) for k in ("steps", "steps_run", "seconds", "eval_accuracy_start",
                                              "eval_accuracy_head_start", "eval_accuracy", "peak_rss_mb")}
        self.event("train_done", run=run.name, **summary)
        if not rebase:
            return run / "patch"
        rebase_patch(run / "patch", bundle, self.cfg.bundle, run / "push")
        return run / "push"

    def push(self, client: FleetClient, run_id: str, patch: Path, digest: str) -> None:
        self.set_status(state="pushing")
        try:
            r = client.push(patch, self.cfg.format, self.outbox())
        except FleetError as e:
            kept = e.status is None or e.status in (424, 429) or e.status >= 500
            self.status["runs"][run_id] = "queued" if kept else "rejected"
            self.set_status(trained_data=digest, last_error=str(e))
            self.event("push_queued" if kept else "push_rejected", run=run_id, error=str(e))
            return
        self.status["runs"][run_id] = "pushed"
        self.set_status(trained_data=digest, last_push={"run": run_id, "patch_id": r["patch_id"], "ts": time.time()})
        self.event("pushed", run=run_id, patch_id=r["patch_id"], bytes=r["bytes"], format=self.cfg.format)


def _remove_temporaries(root: Path) -> None:
    """`.NAME.xxxx` directories of a pull killed before its rename."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
