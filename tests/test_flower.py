"""Flower interop (issue 16): a real Flower SuperLink and two SuperNodes, as local processes on loopback
(insecure), run the zoedge Flower app (apps/flower) for two rounds in each mode on the tiny-bert bundle, each
SuperNode with its own data partition in --node-config. The globals must be zoedge's weighted combination of
the two devices' updates, and what a device rebuilds from a global must be the server's tensors, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from runtime_helpers import write_sentiment
from zoedge.manifest import Manifest
from zoedge.patchdoc import ADAPTER_FILE, COEFFICIENTS_FILE, START_FILE, PatchDoc
from zoedge.runtime.patch import load_patch_tensors, replay_patch
from zoedge.runtime.seedpool import load_coefficients
from zoedge.runtime.tensors import load_tensors, tensor_digest
from zoedge.server.aggregate import fedavg

pytestmark = pytest.mark.slow  # process start-up and one ClientApp process per message: about a minute

BIN = Path(sys.executable).parent
EXAMPLES = (60, 100)  # the two partitions: unequal, so the weights matter
K = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


def descendants(pid: int) -> list[int]:
    """Every live process below pid (Flower starts its SuperExec and app processes in sessions of their own)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the processes and everything below them (by pid), SIGKILL to what is left after 10 s."""
    pids = [d for p in procs for d in descendants(p.pid)] + [p.pid for p in procs if p.poll() is None]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:  # whatever ignored SIGTERM
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(tiny_bert_bundle, tmp_path_factory):
    """A SuperLink and two SuperNodes; yields run(mode, **run_config) -> (result.json, out dir, node run dirs)."""
    if not (BIN / "flower-superlink").is_file():
        pytest.fail(f"flwr is not installed beside {sys.executable}: pip install -e '.[flower]' (make install does)")
    root = tmp_path_factory.mktemp("flower")
    data = [write_sentiment(root / f"part{i}.tsv", n, seed=20 + i) for i, n in enumerate(EXAMPLES)]
    dev = write_sentiment(root / "dev.tsv", 40, seed=1)
    link, nodes = free_port(), [free_port(), free_port()]
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "zoedge-test"\n\n[superlink.zoedge-test]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = root / f"{name}.log"
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=root, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        sl = start("superlink", "flower-superlink", "--insecure", "--port", str(link),
                   "--disable-runtime-dependency-installation")
        wait_port(link, sl, root / "superlink.log")
        for i, port in enumerate(nodes):
            node_config = (f'bundle="{tiny_bert_bundle}" data="{data[i]}" eval="{dev}" '
                           f'work="{root / f"node{i}"}"')
            sn = start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                       "--port", str(port), "--node-config", node_config)
            wait_port(port, sn, root / f"supernode{i}.log")

        def run(mode: str, **settings) -> tuple[dict, Path, list[Path]]:
            out = root / f"out-{mode}"
            rc = {"mode": mode, "bundle": str(tiny_bert_bundle), "out-dir": str(out), "num-server-rounds": 2,
                  "steps": 20, "batch-size": 8, "lr": 1e-2, "eps": 1e-2, **settings}
            overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())
            p = subprocess.run([str(BIN / "flwr"), "run", str(REPO / "apps" / "flower"), "zoedge-test",
                                "--run-config", overrides, "--stream"], env=env, cwd=root, capture_output=True,
                               text=True, timeout=400)
            tail = (p.stdout + p.stderr)[-4000:]
            assert p.returncode == 0 and (out / "result.json").is_file(), f"flwr run {mode} failed:\n{tail}"
            result = json.loads((out / "result.json").read_text())
            return result, out, [root / f"node{i}" / str(result["run_id"]) for i in range(2)]

        yield run
    finally:
        stop(procs)


def client_patches(runs: list[Path], rnd: int) -> tuple[list[Path], list[float]]:
    patches = [r / f"round-{rnd}" / "patch" for r in runs]
    return patches, [float(PatchDoc.load(p).examples) for p in patches]


def test_seed_pool_zo_over_flower(fleet, tiny_bert_bundle):
    result, out, runs = fleet("seed-pool", **{"head-init": "lp"})
    m = Manifest.load(tiny_bert_bundle)
    assert result["rounds"] == 2 and sorted(result["train"]) == sorted(result["evaluate"]) == ["1", "2"]
    assert all(0.0 <= result["evaluate"][r]["accuracy"] <= 1.0 for r in ("1", "2"))
    previous = PatchDoc.load(out / "round-0" / "global").adapter_sha256
    for rnd in (1, 2):
        patches, weights = client_patches(runs, rnd)
        assert sorted(weights) == sorted(map(float, EXAMPLES))
        for r in runs:
            info = json.loads((r / f"round-{rnd}" / "client.json").read_text())
            assert info["global_adapter_sha256"] == previous  # the device rebuilt the server's global
            assert info["continued"] == (rnd == 2)  # round 2 continues the round-1 global's vector
            assert not {"torch", "transformers", "onnx"} & set(info["heavy_modules_loaded"])
        glob = out / f"round-{rnd}" / "global"
        c = np.load(glob / COEFFICIENTS_FILE)
        vectors = [load_coefficients(p, K) for p in patches]
        want = (sum(w * v.astype(np.float64) for w, v in zip(weights, vectors)) / sum(weights)).astype(np.float32)
        assert np.count_nonzero(c) > 0 and np.array_equal(c, want)  # Σ w_i c_i / Σ w_i, float64 -> float32
        doc = PatchDoc.load(glob)
        assert (doc.kind, doc.version, doc.examples) == ("global", rnd, sum(EXAMPLES))
        heads = [load_tensors(p / START_FILE) for p in patches]  # head-init lp: round 1 fits, round 2 keeps
        for name, t in load_tensors(glob / START_FILE).items():  # the global's head start: their weighted mean
            mean = sum(w * h[name].astype(np.float64) for w, h in zip(weights, heads)) / sum(weights)
            assert np.array_equal(t, mean.astype(np.float32))
        starts = {PatchDoc.load(p).adapter_sha256: h for p, h in zip(patches, heads)}
        for d in json.loads((out / f"round-{rnd}" / "round.json").read_text())["devices"]:
            start = starts[d["adapter_sha256"]]  # the server's record of each device is that device's patch
            raw = 4 * K + sum(t.nbytes for t in start.values())  # K float32 + the head start, each a .npy
            assert raw <= d["update_bytes"] <= raw + 128 * (1 + len(start))
        assert tensor_digest(replay_patch(glob, tiny_bert_bundle)) == doc.adapter_sha256  # this process's rebuild
        previous = doc.adapter_sha256
    assert result["adapter_sha256"] == previous
    # the evaluate round: each device rebuilt the final global byte for byte as the server wrote it
    server = (out / "round-2" / "global" / ADAPTER_FILE).read_bytes()
    for r in runs:
        assert (r / "eval-2" / "global" / ADAPTER_FILE).read_bytes() == server
    assert load_patch_tensors(out / "round-2" / "global", m)  # a zoedge patch of the bundle


def test_adapter_fedavg_over_flower(fleet, tiny_bert_bundle):
    result, out, runs = fleet("fedavg", **{"head-init": "lp"})
    m = Manifest.load(tiny_bert_bundle)
    assert result["rounds"] == 2 and sorted(result["evaluate"]) == ["1", "2"]
    previous = PatchDoc.load(out / "round-0" / "global").adapter_sha256
    for rnd in (1, 2):
        patches, weights = client_patches(runs, rnd)
        for r in runs:
            info = json.loads((r / f"round-{rnd}" / "client.json").read_text())
            assert info["global_adapter_sha256"] == previous and info["continued"] == (rnd == 2)
        adapters = [load_tensors(p / ADAPTER_FILE) for p in patches]  # round 2 trained a derived bundle
        raw = sum(t.nbytes for t in adapters[0].values())  # every trainable, as .npy
        for d in json.loads((out / f"round-{rnd}" / "round.json").read_text())["devices"]:
            assert raw <= d["update_bytes"] <= raw + 128 * len(adapters[0])
        glob = load_patch_tensors(out / f"round-{rnd}" / "global", m)
        want = fedavg(adapters, weights)  # what POST /v1/bundles/{id}/aggregate computes
        assert all(np.array_equal(glob[k], want[k]) for k in want)
        plain = {k: sum(w * a[k].astype(np.float64) for w, a in zip(weights, adapters)) / sum(weights)
                 for k in want}
        assert all(np.allclose(glob[k], plain[k], rtol=1e-6, atol=1e-7) for k in want)
        start = load_patch_tensors(out / "round-0" / "global", m)
        assert any(not np.array_equal(glob[k], start[k]) for k in start)  # the global moved
        previous = PatchDoc.load(out / f"round-{rnd}" / "global").adapter_sha256
    server = (out / "round-2" / "global" / ADAPTER_FILE).read_bytes()
    for r in runs:
        assert (r / "eval-2" / "global" / ADAPTER_FILE).read_bytes() == server
