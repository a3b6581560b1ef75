"""`zoedge bench --quick`: the CI smoke test of the benchmark (tiny-bert, a few steps, every contender)."""

from __future__ import annotations

import json
import time

from tests.conftest import REPO, run_cli

CONTENDERS = ["ort-infer-fp32", "ort-infer-int8", "zo-fp32", "zo-int8", "zo-int8-q4-batched", "torch-mezo",
              "torch-backprop", "ort-training"]


def test_bench_quick(tmp_path, sst2):
    t = time.perf_counter()
    p = run_cli("bench", "--quick", "--data", sst2, "--work", REPO / "out" / "bench", "--results", tmp_path,
                timeout=900)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "quick-tiny-bert.json").read_text())
    rows = doc["rows"]
    assert list(rows) == CONTENDERS
    for name, r in rows.items():
        if r.get("ok"):  # numbers ...
            assert r["peak_rss_mb"] > 0, name
            assert (r.get("step_ms") or r.get("forward_ms") or 0) > 0, name
            assert r["forward_passes_per_step"] >= 1, name
            assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3, name
        else:  # ... or a stated reason
            assert r.get("reason"), name
    for name in ("ort-infer-fp32", "ort-infer-int8", "zo-fp32", "zo-int8", "zo-int8-q4-batched"):
        assert rows[name]["ok"], rows[name].get("reason")
        assert rows[name]["torch_imported"] is False, f"{name} imported torch"
    assert rows["zo-int8-q4-batched"]["evaluations_per_step"] == 8
    assert rows["zo-int8"]["curve"][0]["step"] == 0 and rows["zo-int8"]["curve"][-1]["forward_passes"] > 0
    assert {g["goal"] for g in doc["goals"]}, "goal ratios missing"
    md = (tmp_path / "benchmarks-quick.md").read_text()
    assert "zoedge ZO q=1, int8 bundle" in md and "| goal |" in md
    assert (tmp_path / "bench_memory_tiny-bert.png").stat().st_size > 1000
    print(f"zoedge bench --quick: {elapsed:.0f} s")
