"""One-step smoke runs of every bench script on tiny-bert and a toy SST-2 (issue 14: one bench tree, bench/).

bench.kshot has its own in test_bench_kshot.py; the full `zoedge bench --quick` (every contender, fresh exports)
and the onnxruntime-training contender are slow tests in test_bench_quick.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.runtime_helpers import write_sentiment


@pytest.fixture
def toy_sst2(tmp_path) -> Path:
    d = tmp_path / "sst2"
    d.mkdir()
    write_sentiment(d / "train.tsv", 150, seed=0)
    write_sentiment(d / "dev.tsv", 24, seed=2)
    write_sentiment(d / "test.tsv", 30, seed=1)
    return d


def _python_m(module: str, *args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_sidebyside_runs_two_contenders_and_writes_the_table(tmp_path, toy_sst2, tiny_bert_bundle):
    """`python -m bench.sidebyside --quick` on cached bundles (the tiny-bert fixture stands for all three)."""
    work = tmp_path / "work"
    for key in ("fp32", "int8", "int8-copies8"):
        (work / "quick-tiny-bert").mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_bert_bundle, work / "quick-tiny-bert" / f"bundle-{key}")
    p = _python_m("bench.sidebyside", "--quick", "--data", toy_sst2, "--work", work, "--results", tmp_path / "res",
                  "--only", "ort-infer-fp32,zo-int8")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "exporting" not in p.stdout
    rows = json.loads((tmp_path / "res" / "quick-tiny-bert.json").read_text())["rows"]
    assert list(rows) == ["ort-infer-fp32", "zo-int8"]
    for name, r in rows.items():
        assert r["ok"], (name, r.get("reason"))
        assert r["peak_rss_mb"] > 0 and r["torch_imported"] is False, name
    assert rows["zo-int8"]["curve"][-1]["step"] == 20
    assert "zoedge ZO q=1, int8 bundle" in (tmp_path / "res" / "benchmarks-quick.md").read_text()


def test_zoedge_bench_of_an_editable_install_finds_its_checkout(tmp_path):
    """`make install` is an editable install: from any directory `zoedge bench` runs the checkout's bench package
    (here it gets as far as checking --only, which only bench.sidebyside knows)."""
    p = _python_m("zoedge", "bench", "--quick", "--only", "nonesuch", cwd=tmp_path)
    assert p.returncode == 2 and "bad --only" in p.stderr, p.stderr


def test_zoedge_bench_without_a_checkout_is_one_clear_line(tmp_path):
    """A wheel install has no bench package beside zoedge and none importable: one line, exit 2."""
    code = ("import zoedge.cli.bench as b; b._checkout_bench = lambda: None; "
            "from zoedge.cli import app; app(['bench', '--quick'], prog_name='zoedge')")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "needs a source checkout" in p.stderr and "python -m bench.sidebyside" in p.stderr


def test_quant_encoders_on_given_bundles(tmp_path, toy_sst2, tiny_bert_bundle):
    """--reuse: the tiny-bert fixture stands for the fp32 and the int8-static bundle (exporting is tested elsewhere;
    here it would take most of the time)."""
    from bench import quant_encoders

    for key in ("fp32", "int8-static-cal"):
        shutil.copytree(tiny_bert_bundle, tmp_path / "w" / key)
    out = tmp_path / "quant.json"
    quant_encoders.main(["--model", "tiny-bert", "--data", str(toy_sst2), "--work", str(tmp_path / "w"), "--reuse",
                         "--out", str(out), "--schemes", "int8-static-cal", "--probe-rows", "20", "--rounds", "1"])
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny-bert" and doc["test"] == "SST-2 test.tsv (30)"
    assert list(doc["schemes"]) == ["fp32", "int8-static (128 train sentences, output.dense in float)"]
    for row in doc["schemes"].values():
        assert row["agreement_with_fp32"] == 1.0 and 0 <= row["accuracy"]["16"] <= 1
        assert len(row["agreement_5_heads"]) == 5 and row["forward_ms_batch16_2t"]["n"] == 2
    assert (tmp_path / "w" / "calibration.tsv").read_text().count("\n") == 1 + 150 - 5 * 20


def test_lp_sweep_on_a_given_bundle(tmp_path, toy_sst2, tiny_bert_bundle):
    from bench import lp_sweep

    out = tmp_path / "lp.json"
    lp_sweep.main(["--bundle", str(tiny_bert_bundle), "--data", str(toy_sst2), "--examples", "40,80", "--l2", "0.1",
                   "--dev-rows", "20", "--work", str(tmp_path / "w"), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["n"], r["l2"]) for r in rows] == [(40, 0.1), (80, 0.1)]
    assert all(0 <= r["test_acc"] <= 1 and r["dev_ce"] > 0 for r in rows)
    assert len(list((tmp_path / "w" / "cache").glob("feat-*.npy"))) == 3


def test_batch_dependence_on_a_given_bundle(tmp_path, toy_sst2, tiny_bert_bundle, capsys):
    from bench import batch_dependence

    batch_dependence.main([str(tiny_bert_bundle), "--data", str(toy_sst2), "--batches", "1,8",
                           "--out", str(tmp_path / "bd.json")])
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "bd.json").read_text())
    assert set(doc["by_batch"]) == {"1", "8"} and "changed_vs_batch1" in doc["by_batch"]["8"]


def test_kshot_explore_probe_and_train_on_a_toy_split(tmp_path, tiny_bert_bundle):
    """bench.kshot_explore: the probe grid and one short train run (fixed head-start L2) on a toy k-shot split."""
    split = tmp_path / "split"
    split.mkdir()
    for name, n, seed in (("train", 16, 0), ("val", 16, 1), ("test", 24, 2)):
        write_sentiment(split / f"{name}.tsv", n, seed=seed)
    p = _python_m("bench.kshot_explore", "probe", tiny_bert_bundle, split)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert rows[0]["head"] == "exported" and {r["head"] for r in rows[1:]} == {"plain", "centred"}
    assert all(0.0 <= r["test"][0] <= 1.0 for r in rows)
    p = _python_m("bench.kshot_explore", "train", tiny_bert_bundle, split, tmp_path / "p", "--l2", "30",
                  "--set", "steps=3", "--set", "lr=1e-3")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["l2"] == 30 and r["steps"] == 3 and 0.0 <= r["test_accuracy"] <= 1.0
    assert [h["step"] for h in r["history"]][-1] == 3
    lines = write_sentiment(tmp_path / "pool.tsv", 40, seed=3).read_text().splitlines()
    (split / "unlabelled.tsv").write_text("sentence\n" + "\n".join(x.split("\t")[0] for x in lines[1:]) + "\n")
    for head in (tmp_path / "p", "lp"):  # the bias shift --unlabelled would add, on a patch and on the LP head
        p = _python_m("bench.kshot_explore", "prior", tiny_bert_bundle, head, split)
        assert p.returncode == 0, p.stderr[-2000:]
        r = json.loads(p.stdout.splitlines()[-1])
        assert r["label_prior"]["unlabelled"] == 40 and sum(r["predicted_shifted"]) == sum(r["true"]) == 24
        assert 0.0 <= r["test_accuracy_shifted"] <= 1.0 and 0.0 <= r["test_f1_shifted"] <= 1.0


def test_zo_mask_keeps_a_fraction_and_explore_moves_only_its_entries(tmp_path, tiny_bert_bundle):
    """bench.zo_mask writes 0/1 tensors keeping the top fraction of the LoRA Fisher; `kshot_explore train --mask`
    then moves no entry outside them, and some inside (tiny-bert, a toy split)."""
    import numpy as np

    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.patch import load_patch_tensors
    from zoedge.runtime.tensors import load_tensors

    split = tmp_path / "split"
    split.mkdir()
    for name, n, seed in (("train", 16, 0), ("val", 16, 1), ("test", 16, 2)):
        write_sentiment(split / f"{name}.tsv", n, seed=seed)
    masks_file = tmp_path / "mask.safetensors"
    p = _python_m("bench.zo_mask", "tiny-bert", tiny_bert_bundle, split, masks_file, "--keep", "0.05")
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout.splitlines()[-1])
    masks = load_tensors(masks_file)
    kept = int(sum(v.sum() for v in masks.values()))
    assert kept == info["kept"] and abs(kept - 0.05 * info["entries"]) <= 0.01 * info["entries"]
    assert set(np.unique(np.concatenate([v.ravel() for v in masks.values()]))) <= {0.0, 1.0}
    p = _python_m("bench.kshot_explore", "train", tiny_bert_bundle, split, tmp_path / "p", "--mask", masks_file,
                  "--set", "steps=4", "--set", "lr=1e-2", "--set", 'keep="last"')
    assert p.returncode == 0, p.stderr[-2000:]
    b = Bundle.open(tiny_bert_bundle)
    start, trained = b.initial_trainables(), load_patch_tensors(tmp_path / "p", b.manifest)
    moved = {k: trained[k] != start[k] for k in masks}
    assert not any((moved[k] & (masks[k] == 0)).any() for k in masks)
    assert any((moved[k] & (masks[k] == 1)).any() for k in masks)


def test_speed_writes_agreement_and_roofline_rows(tmp_path, toy_sst2, tiny_bert_bundle):
    """`python -m bench.speed` on tiny-bert: fp32 and int8 bundles seeded into its cache, one timing round."""
    from bench.kshot_setup import bundle_key, export_args, model_spec
    from tests.conftest import export_tiny
    from zoedge import datasets

    spec, task = model_spec("tiny-bert"), datasets.load_task("sst2", toy_sst2)
    cache = tmp_path / "cache"
    for quant in ("fp32", "int8"):
        where = cache / f"tiny-bert-sst2-{quant}-{bundle_key(export_args(spec, task, quant))}"
        if quant == "fp32":
            shutil.copytree(tiny_bert_bundle, where)
        else:
            export_tiny(where, "tiny-bert", "--quant", "int8")
    out = tmp_path / "speed.json"
    p = _python_m("bench.speed", "--models", "tiny-bert", "--data", toy_sst2, "--n", 30, "--rounds", 1,
                  "--out", out, "--cache", cache, "--peak-seconds", 0.05, "--zo-steps", 2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "exporting" not in p.stdout
    rows = json.loads(out.read_text())["models"]["tiny-bert"]["rows"]
    assert list(rows) == ["fp32", "int8"]  # int8-smooth is dropped for an encoder
    assert rows["fp32"]["agreement_with_fp32"] == 1.0 and rows["int8"]["scheme"] == "int8-token"
    assert set(rows["fp32"]["ops_per_token"]) == {"fp32"} and rows["int8"]["main_precision"] == "int8"
    for r in rows.values():
        assert r["gops"] > 0 and r["peak_gops"] > 0 and r["forward_ms"]["n"] == 2  # 30 texts: 2 batches, 1 round
        assert r["zo"]["steps"] == 2 and r["zo"]["steps_per_s"] > 0
    assert "| tiny-bert | int8-token |" in out.with_suffix(".md").read_text()


def test_roofline_counts_weight_gemms_only(tmp_path):
    """2*K*N per token for a MatMul on an initializer and on a transposed trainable input; an activation x
    activation MatMul (attention) and a MatMulNBits' K, N attributes are read as documented."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bench.roofline import dense_ops_per_token, gemm_peak

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),  # [8, 16] initializer: 256
             helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),  # trainable a [4, 16] -> [16, 4]
             helper.make_node("MatMul", ["h", "at"], ["l"]),  # 2*16*4 = 128
             helper.make_node("MatMul", ["l", "lt"], ["y"]),  # activation x activation: not counted
             helper.make_node("MatMulNBits", ["x", "q", "s"], ["z"], domain="com.microsoft", K=8, N=32, bits=8,
                              block_size=32)]  # 2*8*32 = 512
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                                           helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 16]),
                                           helper.make_tensor_value_info("lt", TensorProto.FLOAT, [4, "m"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")])
    path = tmp_path / "probe.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert dense_ops_per_token(path) == {"fp32": 256 + 128, "nbits": 512}
    for precision in ("fp32", "int8", "nbits"):
        r = gemm_peak(precision, 64, 64, 64, threads=1, seconds=0.05)
        assert r["gops"] > 0 and r["shape"] == [64, 64, 64]
