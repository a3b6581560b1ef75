"""TFLite (LiteRT) bundles: same outputs as the ONNX bundle, same ZO trajectory, CLI train/eval.

Runs in the separate .venv-tflite (litert-torch pins its own stack): `make test-tflite`.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import export_tiny, run_cli
from runtime_helpers import write_sentiment

pytestmark = pytest.mark.tflite

_MISSING = [m for m in ("ai_edge_litert", "litert_torch") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"TFLITE TESTS NOT RUN: {', '.join(_MISSING)} not installed in this interpreter; "
                "run `make test-tflite` (it builds .venv-tflite with scripts/tflite_env.sh)", allow_module_level=True)

from zoedge.runtime.bundle import Bundle  # noqa: E402
from zoedge.runtime.forward import BoundForward, open_forward  # noqa: E402
from zoedge.runtime.tflite_forward import TFLiteForward  # noqa: E402
from zoedge.runtime.trainer import TrainConfig, train  # noqa: E402

FP32_TOL = 1e-4  # max abs difference, logits and features, TFLite fp32 vs ONNX fp32
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-4  # projected gradients, 20 ZO steps, TFLite vs ONNX backends


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return write_sentiment(d / "train.tsv", 200, seed=0), write_sentiment(d / "dev.tsv", 40, seed=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """tiny-bert exported twice with the same seed: ONNX and TFLite fp32."""
    d = tmp_path_factory.mktemp("pair")
    return (export_tiny(d / "onnx", "tiny-bert", "--format", "onnx", "--quant", "fp32"),
            export_tiny(d / "tflite", "tiny-bert", "--format", "tflite", "--quant", "fp32"))


def texts_of(path, n):
    return [ln.split("\t")[0] for ln in path.read_text().splitlines()[1:n + 1]]


def noisy_trainables(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    """The initial trainables plus non-zero noise (LoRA B = 0 would hide a wrong graph)."""
    rng = np.random.default_rng(seed)
    return {k: v + (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in bundle.initial_trainables().items()}


def both_outputs(onnx_dir, tflite_dir, texts, outputs=("logits", "features"), seed=3):
    """Outputs of both bundles on the same texts with the same random non-zero trainables."""
    got = []
    for d in (onnx_dir, tflite_dir):
        b = Bundle.open(d)
        ids, mask = b.encoder(texts)
        got.append(open_forward(b, noisy_trainables(b, seed))(ids, mask, outputs))
    return got


def test_bundle_layout(pair):
    onnx_b, tfl_b = Bundle.open(pair[0]), Bundle.open(pair[1])
    m = tfl_b.manifest
    assert m.model_format == "tflite" and m.model_file == "model.tflite" and (pair[1] / "model.tflite").is_file()
    assert not (pair[1] / "model.onnx").exists()
    sig = m.signature
    names = ["input_ids", "attention_mask", *[t.name for t in m.trainables]]
    assert [sig["inputs"][n] for n in names] == [f"args_{i}" for i in range(len(names))]
    assert sig["outputs"] == {"logits": "output_0", "features": "output_1"}
    assert (sig["static_batch"], sig["static_seq"], sig["token_dtype"]) == (16, m.max_length, "int32")
    assert sig["keys"] == {"16": "seq_16", "32": "seq_32", "64": "seq_64"} and sig["key"] == "seq_64"
    assert m.quantization_details["sample_max_abs_diff"] < 1e-4
    # same export seed -> identical initial trainables
    assert m.initial_sha256 == onnx_b.manifest.initial_sha256
    a, b = onnx_b.initial_trainables(), tfl_b.initial_trainables()
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("words, bucket", [(4, 16), (20, 32), (200, 64)])
def test_tflite_matches_onnx_tiny_bert(pair, toy, words, bucket):
    """37 rows (two full 16-row chunks and a padded one), run in the smallest sequence bucket that fits."""
    texts = [" ".join((t.split() * 50)[:words]) for t in texts_of(toy[1], 37)]
    width = Bundle.open(pair[1]).encoder(texts)[0].shape[1]
    assert width <= bucket and (bucket == 16 or width > bucket // 2)
    onnx_out, tfl_out = both_outputs(*pair, texts)
    for o, t in zip(onnx_out, tfl_out):
        assert o.shape == t.shape and o.shape[0] == 37
        assert np.abs(o - t).max() < FP32_TOL, np.abs(o - t).max()
    assert np.abs(tfl_out[0]).max() > 1e-2  # not trivially zero


def test_forward_sees_in_place_updates(pair):
    b, ref = Bundle.open(pair[1]), Bundle.open(pair[0])
    tensors, ref_tensors = b.initial_trainables(), ref.initial_trainables()
    fwd, ref_fwd = open_forward(b, tensors), open_forward(ref, ref_tensors)
    assert isinstance(fwd, TFLiteForward) and fwd.copies == 0
    ids, mask = b.encoder(["a fine film"])
    before = fwd(ids, mask, ("logits",))[0].copy()
    rng = np.random.default_rng(0)
    for k in tensors:  # in place, as the optimizer does
        tensors[k] += rng.standard_normal(tensors[k].shape).astype(np.float32) * np.float32(0.1)
        ref_tensors[k][:] = tensors[k]
    after = fwd(ids, mask, ("logits",))[0]
    assert before.shape == after.shape == (1, 2)
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - ref_fwd(ids, mask, ("logits",))[0]).max() < FP32_TOL
    assert fwd.calls == 2 and fwd.examples == 2


def test_too_long_batch_is_a_clear_error(pair):
    from zoedge.errors import ZoedgeError

    b = Bundle.open(pair[1])
    fwd = open_forward(b, b.initial_trainables())
    width = b.manifest.max_length + 1
    with pytest.raises(ZoedgeError, match="does not fit"):
        fwd(np.ones((1, width), np.int64), np.ones((1, width), np.int64), ("logits",))


def test_zo_trajectory_matches_onnx(pair, toy, tmp_path):
    cfg = TrainConfig(steps=20, lr=1e-2, eps=1e-2, head_init="none", keep="last", seed=7)
    r_onnx = train(pair[0], toy[0], tmp_path / "onnx", cfg, log=quiet)
    r_tfl = train(pair[1], toy[0], tmp_path / "tflite", cfg, log=quiet)
    g_onnx = np.load(tmp_path / "onnx" / "trajectory.npy")
    g_tfl = np.load(tmp_path / "tflite" / "trajectory.npy")
    assert g_onnx.shape == g_tfl.shape == (20, 2)
    assert np.abs(g_onnx[:, 0]).max() > 1e-3  # real gradients, not all zero
    np.testing.assert_allclose(g_tfl, g_onnx, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert r_onnx["forward_passes"] == r_tfl["forward_passes"] == 2 * 20


def test_cli_train_and_eval(pair, toy, tmp_path):
    bundle, patch = pair[1], tmp_path / "p"
    run_cli("train", bundle, "--data", toy[0], "--out", patch, "--steps", 5, "--eval", toy[1], check=True)
    assert (patch / "trajectory.npy").is_file()
    base = json.loads(run_cli("eval", bundle, "--data", toy[1], "--json", check=True).stdout.splitlines()[-1])
    patched = json.loads(run_cli("eval", bundle, "--data", toy[1], "--patch", patch, "--json",
                                 check=True).stdout.splitlines()[-1])
    assert base["n"] == patched["n"] == 40
    assert patched["accuracy"] != base["accuracy"] or patched["loss"] != base["loss"]


def test_verify_tflite(pair):
    from zoedge.export.tflite import verify_tflite

    r = verify_tflite(pair[1], n=16)
    assert r["engine"] == "litert" and r["max_abs_diff"] < FP32_TOL and r["prediction_agreement"] == 1.0


def test_int8_tflite_is_smaller_and_close(pair, tmp_path, toy):
    q = export_tiny(tmp_path / "int8", "tiny-bert", "--format", "tflite", "--quant", "int8")
    m = Bundle.open(q).manifest
    assert m.quantization == "int8" and "dynamic_wi8" in m.quantization_details["method"]
    assert (q / "model.tflite").stat().st_size < 0.5 * (pair[1] / "model.tflite").stat().st_size
    fp32_out, int8_out = both_outputs(pair[1], q, texts_of(toy[1], 16), outputs=("logits",))
    assert np.abs(fp32_out[0] - int8_out[0]).max() < 0.05


@pytest.mark.slow
def test_tflite_matches_onnx_minilm(tmp_path, toy):
    onnx_dir = export_tiny(tmp_path / "onnx", "minilm", "--format", "onnx", "--quant", "fp32")
    tfl_dir = export_tiny(tmp_path / "tflite", "minilm", "--format", "tflite", "--quant", "fp32")
    onnx_out, tfl_out = both_outputs(onnx_dir, tfl_dir, texts_of(toy[1], 20))
    for o, t in zip(onnx_out, tfl_out):
        assert np.abs(o - t).max() < FP32_TOL, np.abs(o - t).max()


def test_tflite_matches_onnx_decoder_lm(tmp_path, toy):
    """A decoder LM bundle: summed next-token NLL and token counts, 20 rows (one full chunk + a padded one)."""
    flags = ("--task", "lm", "--trainable", "lora", "--quant", "fp32")
    onnx_dir = export_tiny(tmp_path / "onnx", "tiny-llama", "--format", "onnx", *flags)
    tfl_dir = export_tiny(tmp_path / "tflite", "tiny-llama", "--format", "tflite", *flags)
    assert Bundle.open(tfl_dir).manifest.signature["outputs"] == {"nll_sum": "output_0", "n_tokens": "output_1"}
    onnx_out, tfl_out = both_outputs(onnx_dir, tfl_dir, texts_of(toy[1], 20), outputs=("nll_sum", "n_tokens"))
    np.testing.assert_array_equal(tfl_out[1], onnx_out[1])
    np.testing.assert_allclose(tfl_out[0], onnx_out[0], rtol=1e-5, atol=1e-4)


def test_onnx_bundles_still_use_onnxruntime(pair):
    b = Bundle.open(pair[0])
    assert isinstance(open_forward(b, b.initial_trainables()), BoundForward)
