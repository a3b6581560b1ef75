"""Real pretrained models (slow): quantized bundles keep their predictions; the default recipe learns on SST-2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, tsv_head
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.evaluate import predict
from zoedge.runtime.patch import load_patch_tensors
from zoedge.runtime.trainer import load_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_fp32_and_int8(tmp_path_factory, sst2):
    d = tmp_path_factory.mktemp("minilm")
    for quant in ("fp32", "int8"):
        run_cli("export", "minilm", "--quant", quant, "--out", d / quant, check=True)
    return d


def test_minilm_int8_keeps_the_trained_heads_predictions(minilm_fp32_and_int8, sst2, tmp_path):
    """A head fitted on the fp32 bundle (linear probe, 2,000 sentences), applied unchanged to the int8 bundle:
    the two must predict the same class on >= 95% of 200 test sentences and lose <= 2 points of accuracy."""
    d = minilm_fp32_and_int8
    train = tsv_head(sst2 / "train.tsv", tmp_path / "train.tsv", 2000)
    run_cli("train", d / "fp32", "--data", train, "--out", tmp_path / "lp", "--steps", "1",
            "--keep", "last", check=True)
    test = load_dataset(sst2 / "test.tsv", Bundle.open(d / "fp32").manifest)
    texts, labels = test.texts[:200], test.labels[:200]
    preds = {}
    for quant in ("fp32", "int8"):
        b = Bundle.open(d / quant)
        preds[quant] = predict(b, load_patch_tensors(tmp_path / "lp", b.manifest), texts).argmax(1)
    agreement = float(np.mean(preds["fp32"] == preds["int8"]))
    acc = {q: float(np.mean(p == labels)) for q, p in preds.items()}
    print("minilm int8 vs fp32:", agreement, acc)
    assert agreement >= 0.95 and acc["int8"] >= acc["fp32"] - 0.02, (agreement, acc)


@pytest.mark.parametrize("quant, extra, min_agreement", [
    # The bar: >= 95% agreement with fp32 on 200 sentences. Measured (docs/quantization.md): int8
    # (weight-only for llama) 100%, int4 (HQQ, float zero points) 100%; int8-dynamic keeping down_proj in float
    # 90% (guarded at its measured level, it is not a default).
    ("int8", [], 0.95),
    ("int4", [], 0.95),
    ("int8-dynamic", [], 0.85),
])
def test_smollm2_quantized_agrees_with_fp32(tmp_path, sst2, quant, extra, min_agreement):
    out = tmp_path / f"smollm2-{quant}"
    run_cli("export", "smollm2-135m", "--quant", quant, *extra, "--out", out, check=True)
    p = run_cli("verify", out, "--data", sst2 / "test.tsv", "--n", "200", "--json", check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print("smollm2", quant, r)
    assert r["n"] == 200 and r["prediction_agreement"] >= min_agreement, r


def test_default_recipe_improves_minilm_on_sst2(minilm_fp32_and_int8, sst2, tmp_path):
    """`zoedge train` with defaults on 2,000 SST-2 sentences (dev subset for selection): test accuracy rises
    >= 15 points above the exported bundle, the patch replays bit-exactly, and training stays on the device
    path (no torch in the training process is checked by tests/test_runtime_imports.py)."""
    b = minilm_fp32_and_int8 / "int8"
    dev = tsv_head(sst2 / "dev.tsv", tmp_path / "dev.tsv", 300)
    train = tsv_head(sst2 / "train.tsv", tmp_path / "train.tsv", 2000)
    r = json.loads(run_cli("train", b, "--data", train, "--eval", dev, "--steps", "200",
                           "--out", tmp_path / "p", "--json", check=True).stdout.splitlines()[-1])
    before = json.loads(run_cli("eval", b, "--data", sst2 / "test.tsv", "--json", check=True).stdout.splitlines()[-1])
    after = json.loads(run_cli("eval", b, "--data", sst2 / "test.tsv", "--patch", tmp_path / "p", "--json",
                               check=True).stdout.splitlines()[-1])
    print("default recipe:", r["eval_accuracy_start"], r["eval_accuracy_head_start"], r["eval_accuracy"],
          "test", before["accuracy"], "->", after["accuracy"])
    assert after["n"] == 872
    assert after["accuracy"] >= before["accuracy"] + 0.15, (before, after)
    run_cli("patch", "replay", tmp_path / "p", "--bundle", b, "--out", tmp_path / "replayed", "--json", check=True)
    name = "adapter_model.safetensors"
    assert (tmp_path / "replayed" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


# The SmolLM2 recipe test moved to tests/test_real_kshot.py: it asserted +2 points on the dev rows keep-best
# selected on (issue 14); the k-shot tests there assert on test sentences no selection saw.
