"""Real pretrained models (slow): quantized bundles must agree with the fp32 source on SST-2."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model, quant, min_agreement", [
    ("minilm", "int8", 0.95),
    ("smollm2-135m", "int8", 0.95),
    ("smollm2-135m", "int4", 0.95),
])
def test_quantized_bundle_agrees_with_fp32(tmp_path, sst2, model, quant, min_agreement):
    out = tmp_path / f"{model}-{quant}"
    run_cli("export", model, "--quant", quant, "--out", out, check=True)
    p = run_cli("verify", out, "--data", sst2 / "test.tsv", "--n", "200", "--json", check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(model, quant, r)
    assert r["n"] == 200
    assert r["prediction_agreement"] >= min_agreement, r
