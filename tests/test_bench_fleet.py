"""`python -m bench.fleet_sim` (issue 16's fleet simulation): a tiny configuration on tiny-bert and a toy SST-2,
and the Dirichlet split it deals the devices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bench.fleet_sim import dirichlet_split
from tests.conftest import REPO
from tests.runtime_helpers import write_sentiment


def test_the_dirichlet_split_partitions_the_rows_skewed_and_seeded():
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    parts = dirichlet_split(labels, ["a", "b", "c"], 8, 0.5, seed=3)
    rows = sorted(i for p in parts for i in p)
    assert rows == list(range(1000)) and min(len(p) for p in parts) >= 10  # every row, once
    assert parts == dirichlet_split(labels, ["a", "b", "c"], 8, 0.5, seed=3)
    assert parts != dirichlet_split(labels, ["a", "b", "c"], 8, 0.5, seed=4)
    share = np.array([[sum(labels[i] == c for i in p) / len(p) for c in "abc"] for p in parts])
    assert share[:, 0].max() - share[:, 0].min() > 0.3  # non-IID: the devices' label mixes differ a lot


def test_the_fleet_simulation_runs_three_contenders_and_reports(tmp_path, tiny_bert_bundle):
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    write_sentiment(sst2 / "train.tsv", 120, seed=0)
    write_sentiment(sst2 / "test.tsv", 30, seed=1)
    res = tmp_path / "res"
    args = ["--tasks", "sst2", "--sst2", sst2, "--bundle", f"sst2={tiny_bert_bundle}", "--devices", "3",
            "--per-round", "2", "--rounds", "2", "--steps", "2", "--batch", "4", "--probe-k", "4",
            "--seed-pool", "64", "--work", tmp_path / "work", "--results", res]
    p = subprocess.run([sys.executable, "-m", "bench.fleet_sim", *map(str, args)], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((res / "sst2.json").read_text())
    assert sum(doc["device_examples"]) + doc["server_rows"] == 120 and doc["server_rows"] == 8 and doc["test"] == 30
    for c in ("seed-pool", "fedavg", "single"):
        assert [r["round"] for r in doc["rounds"][c]] == [0, 1, 2]  # round 0: the start every contender shares
        assert doc["rounds"][c][0]["accuracy"] == doc["start_accuracy"]
        assert all(len(r["devices"]) == (1 if c == "single" else 2) for r in doc["rounds"][c][1:])
        assert all(0 <= r["accuracy"] <= 1 for r in doc["rounds"][c])
    sp, fa = doc["rounds"]["seed-pool"][-1], doc["rounds"]["fedavg"][-1]
    assert sp["upload_bytes"] < fa["upload_bytes"] and sp["download_bytes"] > 0
    assert sp["download_bytes"] < sp["download_whole_bytes"] and sp["bytes_per_device"] < fa["bytes_per_device"]
    assert len(doc["difference"]) == 2 and len(doc["final_correct"]["fedavg"]) == 30
    p = subprocess.run([sys.executable, "-m", "bench.fleet_sim", "report", "--results", str(res), "--plot",
                        str(tmp_path / "f.png")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "seed-pool ZO" in p.stdout and "paired SE" in p.stdout and (tmp_path / "f.png").stat().st_size > 0
