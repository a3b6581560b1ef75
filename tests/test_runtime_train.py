"""Device runtime: ZO learns, replays exactly, resumes bit-exactly after SIGKILL, guards divergence."""

from __future__ import annotations

import json

import re

import numpy as np
import pytest

from conftest import REPO, run_cli
from runtime_helpers import checkpoint_step, kill_cli_when, quiet, write_toy_split
from zoedge.errors import ZoedgeError
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.engine import create_session
from zoedge.runtime.forward import BoundForward
from zoedge.runtime.patch import ADAPTER_FILE, replay_patch
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.evaluate import evaluate
from zoedge.runtime.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_split(tmp_path_factory.mktemp("toy"), 400, 200)


def test_zo_reduces_loss_on_a_learnable_task(tiny_bert_bundle, toy, tmp_path):
    """q = 4, lr 2e-2, 300 steps from the random head. Over run seeds 0-3 the dev loss fell by 0.067-0.134
    (mean 0.094, sd 0.029) and accuracy rose by 0.15-0.32; q = 1 was too noisy to assert on (one seed in four
    did not learn). The margins sit about two standard deviations below the mean."""
    train_file, dev_file = toy
    cfg = TrainConfig(steps=300, lr=2e-2, eps=1e-2, perturbations=4, head_init="none", eval_every=100, keep="last",
                      head_lr=0.0)  # ZO on every trainable, the head included
    r = train(tiny_bert_bundle, train_file, tmp_path / "p", cfg, eval_path=dev_file, log=quiet)
    losses = [h["eval_loss"] for h in r["history"]]
    assert losses[-1] < losses[0] - 0.04, losses
    assert r["eval_accuracy"] > r["eval_accuracy_start"] + 0.1
    assert r["forward_passes"] >= 2 * 4 * 300


def test_linear_probe_head_start(tiny_bert_bundle, toy, tmp_path):
    train_file, dev_file = toy
    r = train(tiny_bert_bundle, train_file, tmp_path / "p", TrainConfig(steps=5, head_init="lp"),
              eval_path=dev_file, log=quiet)
    assert r["eval_accuracy_head_start"] >= 0.9 > r["eval_accuracy_start"]


def _flipped(dev_file, tmp_path):
    flipped = tmp_path / "flipped.tsv"
    lines = dev_file.read_text().splitlines()
    flipped.write_text("\n".join([lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in (r.rsplit("\t", 1) for r in lines[1:])]) + "\n")
    return flipped


def test_a_head_start_worse_than_the_exported_head_is_not_kept(tiny_llama_bundle, toy, tmp_path, monkeypatch):
    """A decoder's exported head is its prompt's zero-shot classifier. A head start that scores below it on the
    eval data (here: the probe's fit replaced by a head that always says the first label, with confidence) is
    undone, so training starts from
    (and the patch keeps) the exported head. The head stays in ZO (head-lr 0), where lr 1e-9 leaves it in place."""
    import zoedge.runtime.head_start as hs

    real = hs.fit_probe_head

    def negated(m, bundle, evaluator, data, tensors, *a, **k):
        real(m, bundle, evaluator, data, tensors, *a, **k)
        for t in m.trainables:
            if t.role == "head":
                tensors[t.name][...] = 0.0
                if len(t.shape) == 1:
                    tensors[t.name][0] = 20.0
        return {t.name: tensors[t.name].copy() for t in m.trainables if t.role == "head"}, []

    monkeypatch.setattr(hs, "fit_probe_head", negated)
    train_file, dev_file = toy
    r = train(tiny_llama_bundle, train_file, tmp_path / "p", TrainConfig(steps=2, head_init="lp", lr=1e-9, head_lr=0.0),
              eval_path=dev_file, log=quiet)
    assert r["eval_accuracy_head_start"] is None
    assert not (tmp_path / "p" / "start.safetensors").exists()
    b = Bundle.open(tiny_llama_bundle)
    heads = [t.name for t in b.manifest.trainables if t.role == "head"]
    got = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    for k in heads:
        np.testing.assert_allclose(got[k], b.initial_trainables()[k], atol=1e-6)


def test_a_decoders_head_start_never_scores_below_its_exported_head(tiny_llama_bundle, toy, tmp_path):
    """Eval data that disagrees with the training data (labels flipped): whatever the probe (centred on the
    exported head, its L2 chosen on that eval data) does, the head training starts from is not worse there than
    the exported head by the selection metric (eval cross-entropy)."""
    train_file, dev_file = toy
    lines: list[str] = []
    r = train(tiny_llama_bundle, train_file, tmp_path / "p", TrainConfig(steps=2, head_init="lp", lr=1e-9, head_lr=0.0),
              eval_path=_flipped(dev_file, tmp_path), log=lines.append)
    loss = {k: float(re.search(r"loss ([0-9.]+)", next(x for x in lines if x.startswith(k))).group(1))
            for k in ("start: eval", "linear-probe head: eval")}
    kept = r["eval_accuracy_head_start"] is not None
    assert (loss["linear-probe head: eval"] <= loss["start: eval"]) if kept else True, (loss, lines)
    assert kept == (tmp_path / "p" / "start.safetensors").exists()


def test_an_encoders_random_head_is_no_baseline_to_keep(tiny_bert_bundle, toy, tmp_path):
    train_file, dev_file = toy
    r = train(tiny_bert_bundle, train_file, tmp_path / "p", TrainConfig(steps=2, head_init="lp", lr=1e-9),
              eval_path=_flipped(dev_file, tmp_path), log=quiet)
    assert r["eval_accuracy_head_start"] is not None and (tmp_path / "p" / "start.safetensors").exists()


@pytest.mark.parametrize("optimizer, q", [("zo-sgd", 1), ("zo-sgd", 3), ("zo-momentum", 1), ("zo-adam", 2)])
def test_trajectory_replay_is_bit_exact(tiny_bert_bundle, toy, tmp_path, optimizer, q):
    train_file, dev_file = toy
    out = tmp_path / "p"
    cfg = TrainConfig(steps=40, lr=1e-2 if optimizer != "zo-adam" else 1e-3, optimizer=optimizer, perturbations=q,
                      weight_decay=0.01, head_init="lp", keep="last")
    train(tiny_bert_bundle, train_file, out, cfg, log=quiet)
    trained = load_tensors(out / ADAPTER_FILE)
    replayed = replay_patch(out, tiny_bert_bundle)
    initial = Bundle.open(tiny_bert_bundle).initial_trainables()
    assert any(not np.array_equal(trained[k], initial[k]) for k in trained)
    for k in trained:
        assert np.array_equal(trained[k], replayed[k]), k


def test_zo_estimate_matches_autograd_directional_derivative(tiny_bert_bundle, toy):
    """(L(θ+εz) - L(θ-εz)) / 2ε through onnxruntime ≈ ∇L·z through torch autograd."""
    import torch

    from zoedge.export.assemble import build_selection
    from zoedge.export.onnx_graph import TrainablesAsInputs
    from zoedge.models.registry import load_source
    from zoedge.runtime import objectives
    from zoedge.runtime.trainer import load_dataset
    from zoedge.runtime.zo import DirectionCache, perturbation_cycle

    bundle = Bundle.open(tiny_bert_bundle)
    m = bundle.manifest
    rng = np.random.default_rng(0)
    tensors = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.05) for k, v in bundle.initial_trainables().items()}
    data = load_dataset(toy[0], m, limit=32)
    ids, mask = bundle.encoder(data.texts)
    fwd = BoundForward(create_session(bundle.path, m), tensors)
    dirs = DirectionCache([(k, v.shape) for k, v in tensors.items()], keep=True)
    eps = 1e-3
    loss = lambda: objectives.cross_entropy(fwd(ids, mask, ("logits",))[0], data.labels)  # noqa: E731
    lp, lm = perturbation_cycle(tensors, dirs, 7, 1, 0, eps, loss_at=loss)
    zo = (lp - lm) / (2 * eps)

    sel = build_selection(load_source("tiny-bert"), "classify", 2, [], ["lora", "head"])
    wrapper = TrainablesAsInputs(sel.module, sel.param_names).eval()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in tensors.items()}
    logits, _ = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), params)
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.labels)).backward()
    directional = sum(float((params[k].grad.numpy().astype(np.float64) * z).sum()) for k, z in dirs(7, 1, 0))
    assert abs(zo - directional) <= 0.02 * abs(directional) + 1e-4, (zo, directional)


def test_sigkill_then_resume_is_bit_exact(tiny_bert_bundle, toy, tmp_path):
    train_file, dev_file = toy
    steps = 600
    args = ["train", tiny_bert_bundle, "--data", train_file, "--eval", dev_file, "--eval-every", "100",
            "--eval-limit", "50", "--steps", str(steps), "--checkpoint-every", "25", "--lr", "1e-2", "--seed", "3", "--json"]
    ref = tmp_path / "ref"
    run_cli(*args, "--out", ref, check=True)

    out = tmp_path / "killed"  # killed as soon as a checkpoint past step 0 is there (the head start's is step 0)
    killed = kill_cli_when([*args, "--out", out], lambda: checkpoint_step(out) > 0, REPO)
    assert killed, "training finished before it could be killed; make the run longer"
    assert not (out / "patch.json").exists()
    p = run_cli(*args, "--out", out, "--resume", check=True)
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps_run"] == steps
    a, b = load_tensors(ref / ADAPTER_FILE), load_tensors(out / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((ref / "patch.json").read_text())["adapter_sha256"] == \
        json.loads((out / "patch.json").read_text())["adapter_sha256"]
    assert not (out / "checkpoint.safetensors").exists()


def test_divergence_guard_rolls_back_and_recovers(tiny_bert_bundle, toy, tmp_path):
    messages = []
    # lr 3: five rollbacks cut it to 1/128, above LR_CUT_FLOOR, so the run finishes (lr 50 now stops at step 4)
    cfg = TrainConfig(steps=60, lr=3.0, eps=1e-2, head_init="none", checkpoint_every=10, keep="last", head_lr=0.0)
    r = train(tiny_bert_bundle, toy[0], tmp_path / "p", cfg, log=messages.append)
    assert r["rollbacks"] >= 1
    assert any("divergence guard" in m for m in messages)
    assert r["steps_run"] == 60
    t = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    assert all(np.isfinite(v).all() for v in t.values())
    lrs = np.load(tmp_path / "p" / "trajectory.npy")[:, -1]
    assert lrs.min() < 3.0  # the learning rate was lowered


def test_memory_planner(tiny_bert_bundle, toy, tmp_path):
    with pytest.raises(ZoedgeError, match="cannot fit this bundle"):
        train(tiny_bert_bundle, toy[0], tmp_path / "a", TrainConfig(steps=2, max_memory="20MB"), log=quiet)
    r = train(tiny_bert_bundle, toy[0], tmp_path / "b", TrainConfig(steps=2, batch_size=8, max_memory="2GB"), log=quiet)
    assert r["batch_size"] == 8


def test_bound_forward_sees_in_place_updates(tiny_bert_bundle):
    b = Bundle.open(tiny_bert_bundle)
    tensors = b.initial_trainables()
    fwd = BoundForward(create_session(b.path, b.manifest), tensors)
    ids, mask = b.encoder(["a fine film"])
    before = fwd(ids, mask, ("logits",))[0].copy()
    head = next(t.name for t in b.manifest.trainables if t.role == "head")
    tensors[head] += np.random.default_rng(0).standard_normal(tensors[head].shape).astype(np.float32)  # in place
    after = fwd(ids, mask, ("logits",))[0]
    assert np.abs(after - before).max() > 1e-3


def test_eval_with_and_without_patch(tiny_bert_bundle, toy, tmp_path):
    train(tiny_bert_bundle, toy[0], tmp_path / "p", TrainConfig(steps=3, head_init="lp"), log=quiet)
    base = json.loads(run_cli("eval", tiny_bert_bundle, "--data", toy[1], "--json", check=True).stdout.splitlines()[-1])
    patched = json.loads(run_cli("eval", tiny_bert_bundle, "--data", toy[1], "--patch", tmp_path / "p", "--json",
                                 check=True).stdout.splitlines()[-1])
    assert base["n"] == patched["n"] == 200
    assert patched["accuracy"] > base["accuracy"]
    assert patched["peak_rss_mb"] > 0


def test_batched_perturbations_match_sequential(tmp_path, toy):
    """P-RGE: q perturbations and both signs in one forward over the copies axis give the same projected
    gradients as q sequential in-place perturbations (same seeds, same z), and replay exactly."""
    from conftest import export_tiny

    plain = export_tiny(tmp_path / "plain", "tiny-bert")
    copies = export_tiny(tmp_path / "copies", "tiny-bert", "--copies", 4)
    assert np.array_equal(Bundle.open(plain).initial_trainables()["base_model.model.classifier.weight"],
                          Bundle.open(copies).initial_trainables()["base_model.model.classifier.weight"])
    cfg = dict(steps=25, lr=1e-2, head_init="lp", keep="last", head_lr=0.0)  # copies bundles have no exact head
    r_seq = train(plain, toy[0], tmp_path / "seq", TrainConfig(perturbations=2, **cfg), log=quiet)
    r_bat = train(copies, toy[0], tmp_path / "bat", TrainConfig(**cfg), log=quiet)
    assert r_seq["forward_passes"] - r_bat["forward_passes"] == 25 * 3  # 1 forward per step instead of 4
    g_seq = np.load(tmp_path / "seq" / "trajectory.npy")
    g_bat = np.load(tmp_path / "bat" / "trajectory.npy")
    assert g_seq.shape == g_bat.shape == (25, 3)
    np.testing.assert_allclose(g_bat, g_seq, rtol=2e-2, atol=2e-3)
    replayed = replay_patch(tmp_path / "bat", copies)
    trained = load_tensors(tmp_path / "bat" / ADAPTER_FILE)
    assert all(np.array_equal(trained[k], replayed[k]) for k in trained)


def test_ort_format_bundle_trains(tmp_path, toy):
    """An ORT-Mobile (.ort flatbuffer) bundle trains through the same code path."""
    from conftest import export_tiny

    b = export_tiny(tmp_path / "ort", "tiny-bert", "--format", "ort")
    r = train(b, toy[0], tmp_path / "p", TrainConfig(steps=20, head_init="lp"), eval_path=toy[1], log=quiet)
    assert r["steps_run"] == 20 and r["eval_accuracy_head_start"] > r["eval_accuracy_start"]
    replayed = replay_patch(tmp_path / "p", b)
    trained = load_tensors(tmp_path / "p" / ADAPTER_FILE)
    assert all(np.array_equal(trained[k], replayed[k]) for k in trained)


def test_roles_train_only_a_subset_and_replay(tiny_bert_bundle, toy, tmp_path):
    """--roles lora_B,head (LoRA-FA): A stays at its initial value; replay still reproduces the patch."""
    out = tmp_path / "p"
    train(tiny_bert_bundle, toy[0], out, TrainConfig(steps=20, lr=1e-2, head_init="none", keep="last",
                                                     roles=["lora_B", "head"]), log=quiet)
    m = Bundle.open(tiny_bert_bundle).manifest
    initial = Bundle.open(tiny_bert_bundle).initial_trainables()
    trained = load_tensors(out / ADAPTER_FILE)
    for t in m.trainables:
        moved = not np.array_equal(trained[t.name], initial[t.name])
        assert moved == (t.role in ("lora_B", "head")), t.name
    replayed = replay_patch(out, tiny_bert_bundle)
    assert all(np.array_equal(trained[k], replayed[k]) for k in trained)
    with pytest.raises(ZoedgeError, match="bad --roles"):
        train(tiny_bert_bundle, toy[0], tmp_path / "q", TrainConfig(steps=2, roles=["bias"]), log=quiet)


def test_linear_probe_l2_is_chosen_on_held_out_data():
    """Few noisy examples in many dimensions: the held-out cross-entropy must prefer real regularisation, from a
    held-out fifth or from given eval data; with under 50 examples and nothing held out, the default."""
    from zoedge.constants import PROBE_DEFAULT_L2, PROBE_L2_GRID
    from zoedge.runtime.probe import choose_l2

    rng = np.random.default_rng(0)
    n, h = 240, 300
    y = rng.integers(0, 2, n)
    x = (rng.standard_normal((n, h)) + 0.4 * y[:, None] * (np.arange(h) < 5)).astype(np.float32)  # 5 of 300 dims
    l2, scores = choose_l2(x[:200], y[:200], 2)
    assert set(scores) == set(PROBE_L2_GRID)
    assert l2 >= 1.0 and scores[l2]["loss"] < scores[1e-2]["loss"]
    l2_eval, scores_eval = choose_l2(x[:40], y[:40], 2, held_out=(x[200:], y[200:]))
    assert l2_eval >= 1.0 and scores_eval[l2_eval]["loss"] == min(v["loss"] for v in scores_eval.values())
    assert choose_l2(x[:40], y[:40], 2) == (PROBE_DEFAULT_L2, {})


def test_centred_probe_shrinks_to_its_prior():
    """A decoder's probe is centred on the zero-shot head: at a large L2 it gives that head back, at a small one
    it fits the data like a plain probe; a large L2 no longer makes the solver diverge."""
    from zoedge.runtime.probe import fit_linear_probe

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 64)
    x = (rng.standard_normal((64, 16)) + 1.5 * y[:, None] * (np.arange(16) < 2)).astype(np.float32)
    w0 = rng.standard_normal((2, 16)).astype(np.float32)
    b0 = np.array([0.3, -0.3], np.float32)
    w, b = fit_linear_probe(x, y, 2, l2=1e6, prior=(w0, b0))
    margin = (x @ w.T + b) @ [1, -1]  # the bias is not shrunk: compare what softmax reads, the logit margin
    assert np.abs(margin - (x @ w0.T + b0) @ [1, -1]).max() < 0.02
    w, b = fit_linear_probe(x, y, 2, l2=1e-3, prior=(w0, b0))
    assert ((x @ w.T + b).argmax(1) == y).mean() > 0.9
    w, b = fit_linear_probe(x, y, 2, l2=100.0)
    assert np.isfinite(w).all() and np.abs(w).max() < 1


def test_linear_probe_ignores_near_constant_features():
    """A feature with ~zero variance must not get a huge weight (it made ZO perturbations explode)."""
    from zoedge.runtime.probe import fit_linear_probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    x = rng.standard_normal((500, 8)) + y[:, None] * 1.0  # Bayes accuracy ~0.91 on the 7 live features
    x[:, 3] = 0.7 + rng.standard_normal(500) * 1e-9  # near-constant
    w, b = fit_linear_probe(x.astype(np.float32), y, 2)
    assert np.all(w[:, 3] == 0) and np.abs(w).max() < 10
    assert ((x @ w.T + b).argmax(1) == y).mean() > 0.85


def test_decoder_picks_its_prompt_by_held_out_probe_accuracy(tiny_llama_bundle, toy, tmp_path):
    """The default decoder recipe: a linear-probe head start through the best of the bundle's prompt candidates
    (the exported prompt, a continuation, the chat template); the patch records the choice and the scores."""
    train_file, dev_file = toy
    m = Bundle.open(tiny_llama_bundle).manifest
    assert m.prompt_candidates[0] == m.prompt_template and len(m.prompt_candidates) == 3
    assert any("<|im_start|>assistant" in c for c in m.prompt_candidates)
    train(tiny_llama_bundle, train_file, tmp_path / "p", TrainConfig(steps=2), eval_path=dev_file, log=quiet)
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert doc["hyperparameters"]["head_init"] == "lp"
    searched = doc["prompt_search"]
    assert [r["prompt_template"] for r in searched] == m.prompt_candidates
    best = max(r["held_out_accuracy"] for r in searched)
    assert doc["prompt_template"] == next(r["prompt_template"] for r in searched if r["held_out_accuracy"] == best)


def test_a_decoder_patch_is_read_through_its_prompt(tiny_llama_bundle, toy, tmp_path):
    train_file, dev_file = toy
    template = "Text: {sentence} Mood:"
    r = train(tiny_llama_bundle, train_file, tmp_path / "p", TrainConfig(steps=2, prompt=template, keep="last",
                                                                        eval_every=2), eval_path=dev_file, log=quiet)
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert doc["prompt_template"] == template and "prompt_search" not in doc
    through_patch = evaluate(tiny_llama_bundle, dev_file, tmp_path / "p")
    assert through_patch["loss"] == pytest.approx(r["history"][-1]["eval_loss"], abs=1e-6)
    (tmp_path / "p2").mkdir()  # the same tensors read through the bundle's own prompt score differently
    for f in (tmp_path / "p").iterdir():
        (tmp_path / "p2" / f.name).write_bytes(f.read_bytes())
    doc.pop("prompt_template")
    (tmp_path / "p2" / "patch.json").write_text(json.dumps(doc))
    assert evaluate(tiny_llama_bundle, dev_file, tmp_path / "p2")["loss"] != pytest.approx(through_patch["loss"], abs=1e-6)


def test_prompt_option_errors(tiny_llama_bundle, tiny_bert_bundle, toy, tmp_path):
    train_file, _ = toy
    with pytest.raises(ZoedgeError, match="must contain {sentence}"):
        train(tiny_llama_bundle, train_file, tmp_path / "a", TrainConfig(steps=1, prompt="no slot"), log=quiet)
    with pytest.raises(ZoedgeError, match="only decoder classify"):
        train(tiny_bert_bundle, train_file, tmp_path / "b", TrainConfig(steps=1, prompt="x {sentence}"), log=quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
