"""`zoedge agent` (issue 15): two agent processes and a fleet server on loopback through two rounds of
train -> push -> automatic aggregation -> pull, with one agent SIGKILLed in the middle of its training; plus the
config's one-line errors and the state-directory lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from runtime_helpers import checkpoint_step, write_sentiment
from server_conftest import ADMIN, LiveServer, make_settings
from zoedge.device.agent_config import load_config
from zoedge.device.client import FleetClient
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest

DEADLINE_S = 150


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zoedge", "agent", "--config", str(config)], cwd=REPO,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def status(state: Path) -> dict:
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(what: str, check, procs=(), timeout: float = DEADLINE_S, logs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"an agent exited ({p.returncode}) while waiting for {what}"
        time.sleep(0.1)
    tails = "\n".join(f"{log}:\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def globals_of(url: str, bundle_id: str) -> list[dict]:
    with FleetClient(url, ADMIN, retries=1) as c:
        return sorted(c.list_patches(bundle_id=bundle_id, kind="global"), key=lambda p: p["version"])


def training_intervals(evs: list[dict], kills: list[float] = ()) -> list[tuple[float, float]]:
    """(start, end) of every training: train_start to train_done / train_paused, or to the kill that ended its
    process (the lock dies with the process)."""
    out, begin = [], None
    for e in evs:
        if e["event"] == "train_start":
            begin = e["ts"]
        elif e["event"] in ("train_done", "train_paused", "start") and begin is not None:
            end = e["ts"]
            if e["event"] == "start":
                end = max([k for k in kills if begin <= k <= e["ts"]], default=end)
            out.append((begin, end))
            begin = None
    return out


@pytest.mark.slow  # ~30 s: runs in `make test-slow` (CI); keeps `make test` under 5 minutes
def test_two_agents_improve_one_global_patch_through_a_kill(tiny_bert_bundle, tmp_path):
    live = LiveServer(make_settings(tmp_path / "srv", "sqlite", auto_aggregate=2)).start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        with FleetClient(live.url, ADMIN) as admin:
            bundle_id = admin.publish_bundle(tiny_bert_bundle)["bundle_id"]
            tokens = {n: admin.register_device(n)["token"] for n in ("a", "b")}
        dirs = {}
        for i, name in enumerate(("a", "b")):
            d = tmp_path / name
            (d / "inbox").mkdir(parents=True)
            write_sentiment(d / "inbox" / "day1.tsv", 120, seed=10 + i)
            steps = 4000 if name == "a" else 40  # a's run is long enough to be killed in the middle (~10 s)
            (d / "agent.toml").write_text(f'''
server = "{live.url}"
token = "{tokens[name]}"
bundle = "bundle"
bundle_id = "{bundle_id}"
data = "inbox"
state_dir = "state"
interval = 0.3
train_lock = "{tmp_path / 'train.lock'}"
[train]
steps = {steps}
checkpoint_every = 5
''')
            dirs[name] = d
        logs = {n: dirs[n] / "agent.log" for n in dirs}
        procs = {n: start_agent(dirs[n] / "agent.toml", logs[n]) for n in dirs}

        # round 1: kill a while it trains, once a checkpoint exists; start it again with the same command line
        run_a = wait_for("a to checkpoint", lambda: next((p for p in (dirs["a"] / "state" / "runs").glob("*/patch")
                                                          if (p / "checkpoint.safetensors").is_file()), None),
                         procs.values(), logs=logs.values())
        wait_for("a past step 0", lambda: checkpoint_step(run_a) > 0, procs.values(), logs=logs.values())
        assert status(dirs["a"] / "state").get("state") == "training"  # into the ZO steps, not done
        killed_at = time.time()
        procs["a"].send_signal(signal.SIGKILL)
        procs["a"].wait(10)
        assert not (run_a / "patch.json").exists()
        procs["a"] = start_agent(dirs["a"] / "agent.toml", logs["a"])
        g1 = wait_for("global version 1", lambda: globals_of(live.url, bundle_id), procs.values(),
                      logs=logs.values())[0]
        assert g1["version"] == 1 and len(g1["parent_ids"]) == 2
        resumed = [e for e in events(logs["a"]) if e["event"] == "train_log" and "resuming at step" in e["msg"]]
        assert resumed, "the restarted agent did not resume its checkpoint"
        assert int(resumed[0]["msg"].split("resuming at step ")[1].split()[0]) > 0, resumed

        # round 2: both pull global 1; new data arrives; both train from it and push; global 2 follows
        for name in dirs:
            wait_for(f"{name} to pull global 1", lambda n=name: (status(dirs[n] / "state").get("global") or {})
                     .get("version") == 1, procs.values(), logs=logs.values())
            write_sentiment(dirs[name] / "inbox" / "day2.tsv", 80, seed=20 + ord(name))
        g2 = wait_for("global version 2", lambda: [g for g in globals_of(live.url, bundle_id) if g["version"] == 2],
                      procs.values(), logs=logs.values())[0]
        with FleetClient(live.url, ADMIN) as admin:
            parents = [admin.get_patch(i) for i in g2["parent_ids"]]
        assert {p["version"] for p in parents} == {1}  # uploaded in round 1 -> 2: trained from global 1
        assert {p["kind"] for p in parents} == {"trajectory"}  # replayed by the server from the bundle + start
        for name in dirs:
            wait_for(f"{name} to pull global 2", lambda n=name: (status(dirs[n] / "state").get("global") or {})
                     .get("version") == 2, procs.values(), logs=logs.values())

        # never two trainings at once (the shared train_lock), every event one JSON line
        spans = {n: training_intervals(events(logs[n]), [killed_at] if n == "a" else []) for n in dirs}
        for s0, e0 in spans["a"]:
            for s1, e1 in spans["b"]:
                assert e0 <= s1 + 0.05 or e1 <= s0 + 0.05, (spans["a"], spans["b"])
        for n in dirs:
            lines = logs[n].read_text().splitlines()
            assert lines and all(json.loads(line)["event"] for line in lines)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        live.stop()
    assert all(p.returncode == 0 for p in procs.values()), [p.returncode for p in procs.values()]
    for name in dirs:
        st = status(dirs[name] / "state")
        assert st["state"] == "stopped" and st["global"]["version"] == 2
        assert Manifest.load(dirs[name] / "bundle").bundle_id == bundle_id


def test_config_errors_are_one_line(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('server = "http://x"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\n')
    with pytest.raises(ZoedgeError, match="give 'token' or 'token_file'"):
        load_config(cfg)
    cfg.write_text('server = "http://x"\ntoken = "t"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\n[train]\nstepz = 3\n')
    with pytest.raises(ZoedgeError, match=r"\[train\] has no setting 'stepz'"):
        load_config(cfg)
    cfg.write_text('server = "http://x"\ntoken = "t"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\ninterval = -1\n')
    with pytest.raises(ZoedgeError, match="'interval' must be a non-negative number"):
        load_config(cfg)
    p = subprocess.run([sys.executable, "-m", "zoedge", "agent", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "interval" in p.stderr
    cfg.write_text('server = "http://x"\ntoken = "t"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\n')
    c = load_config(cfg)
    assert c.bundle == (tmp_path / "b").resolve() and c.interval == 300.0 and c.format == "trajectory"


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('server = "http://127.0.0.1:9"\ntoken = "t"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\n'
                   'interval = 30\n')
    first = subprocess.Popen([sys.executable, "-m", "zoedge", "agent", "--config", str(cfg)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the first agent to start", lambda: (tmp_path / "s" / "status.json").is_file(), [first], timeout=60)
        p = subprocess.run([sys.executable, "-m", "zoedge", "agent", "--config", str(cfg)], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
        assert p.returncode == 2 and "another zoedge agent is running" in p.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert first.returncode == 0
    assert os.path.exists(tmp_path / "s" / "agent.lock")


def test_a_run_over_its_time_budget_pauses_and_resumes_next_cycle(tiny_bert_bundle, tmp_path):
    import io

    from zoedge.device.agent import Agent
    from zoedge.runtime.patch import read_patch

    write_sentiment(tmp_path / "inbox.tsv", 80, seed=3)
    (tmp_path / "agent.toml").write_text(f'server = "http://127.0.0.1:9"\ntoken = "t"\nbundle = "{tiny_bert_bundle}"\n'
                                         'data = "inbox.tsv"\nstate_dir = "s"\ntrain_seconds = 0.3\n'
                                         '[train]\nsteps = 400\ncheckpoint_every = 5\n')
    cfg = load_config(tmp_path / "agent.toml")
    out = io.StringIO()
    agent = Agent(cfg, out)
    cfg.state_dir.mkdir()
    run = cfg.state_dir / "runs" / "r"
    run.mkdir(parents=True)
    (run / "train.jsonl").write_text("".join(json.dumps({"sentence": f"{w} film", "label": str(i % 2)}) + "\n"
                                             for i, w in enumerate(["great", "awful"] * 20)))
    assert agent.train(run, run / "train.jsonl", None) is None  # over budget: paused at a step
    assert (run / "patch" / "checkpoint.safetensors").is_file() and not (run / "patch" / "patch.json").exists()
    cfg.train_seconds = 0
    patch = agent.train(run, run / "train.jsonl", None)
    assert patch == run / "patch" and read_patch(patch)["steps"] == 400
    evs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in evs if e["event"].startswith("train_") and e["event"] != "train_log"] == [
        "train_start", "train_paused", "train_start", "train_done"]
    assert any("resuming at step" in e.get("msg", "") for e in evs)
