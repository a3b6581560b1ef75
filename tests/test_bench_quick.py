"""`zoedge bench --quick` (bench.sidebyside): the CI smoke test of the benchmark (tiny-bert, a few steps, every
contender, fresh exports). The one-step smoke tests of every bench script are in test_bench_scripts.py."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import run_cli

# onnxruntime-training needs its own 1.1 GB venv (in the user's cache directory): its own slow test below.
CONTENDERS = ["ort-infer-fp32", "ort-infer-int8", "zo-fp32", "zo-int8", "zo-int8-q4-batched", "torch-mezo",
              "torch-backprop"]


@pytest.mark.slow  # ~40 s: `make test-slow` (CI); every bench script's fast smoke test is in `make test`
def test_bench_quick(tmp_path, sst2):
    """Every contender must run: a failure is a failure. Bundles are exported afresh into tmp_path, so an
    exporter change is tested by this run."""
    t = time.perf_counter()
    p = run_cli("bench", "--quick", "--data", sst2, "--work", tmp_path / "work", "--results", tmp_path,
                "--only", ",".join(CONTENDERS), timeout=900)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "quick-tiny-bert.json").read_text())
    rows = doc["rows"]
    assert list(rows) == CONTENDERS
    for name, r in rows.items():
        assert r.get("ok"), (name, r.get("reason"))
        assert r["peak_rss_mb"] > 0, name
        assert (r.get("step_ms") or r.get("forward_ms") or 0) > 0, name
        assert r["forward_passes_per_step"] >= 1, name
        assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3, name
    for name in ("ort-infer-fp32", "ort-infer-int8", "zo-fp32", "zo-int8", "zo-int8-q4-batched"):
        assert rows[name]["torch_imported"] is False, f"{name} imported torch"
    assert rows["zo-int8-q4-batched"]["evaluations_per_step"] == 8
    assert rows["zo-int8"]["curve"][0]["step"] == 0 and rows["zo-int8"]["curve"][-1]["forward_passes"] > 0
    assert {g["goal"] for g in doc["goals"]}, "goal ratios missing"
    md = (tmp_path / "benchmarks-quick.md").read_text()
    assert "zoedge ZO q=1, int8 bundle" in md and "| goal |" in md
    assert (tmp_path / "bench_memory_tiny-bert.png").stat().st_size > 1000
    print(f"zoedge bench --quick: {elapsed:.0f} s")


@pytest.mark.slow
def test_bench_quick_ort_training(tmp_path, sst2):
    """The onnxruntime-training 1.19.2 contender in its own venv (created once in the cache directory)."""
    p = run_cli("bench", "--quick", "--data", sst2, "--work", tmp_path / "work", "--results", tmp_path,
                "--only", "ort-training", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads((tmp_path / "quick-tiny-bert.json").read_text())["rows"]["ort-training"]
    assert row.get("ok"), row.get("reason")
    assert row["peak_rss_mb"] > 0 and (row.get("step_ms") or 0) > 0
