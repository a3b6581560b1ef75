"""Plan and run `zoedge bench` (`python -m bench.sidebyside`): export the bundles once (cached), then each
contender in its own worker process; `main` writes the per-model JSON, the plots and the markdown table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench
from bench import thread_env
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.trainer import default_recipe

ORDER = ["ort-infer-fp32", "ort-infer-int8", "zo-fp32", "zo-int8", "zo-int8-q4-batched", "torch-mezo",
         "torch-backprop", "ort-training"]
ENCODERS = {"minilm", "tiny-bert"}

# Per model: full-run sizes. Learning runs: zo-int8 (learn_steps) and torch-backprop (backprop_steps).
FULL = {
    "minilm": dict(batch=16, max_length=64, steps=20, warmup=3, learn_steps=3000, eval_every=250,
                   backprop_steps=600, backprop_eval_every=50, train_rows=2000, test_limit=0),
    # SmolLM2: a forward is ~15x MiniLM's, so fewer steps and the first 400 test sentences (SE ~2 points).
    "smollm2-135m": dict(batch=16, max_length=48, steps=6, warmup=2, learn_steps=300, eval_every=100,
                         backprop_steps=100, backprop_eval_every=25, train_rows=2000, test_limit=400),
}
QUICK = dict(batch=8, max_length=32, steps=5, warmup=1, learn_steps=20, eval_every=10, backprop_steps=10,
             backprop_eval_every=5, train_rows=256, test_limit=64)


HAND_WRITTEN = "<!-- hand-written below: kept when the tables above are regenerated -->"


def settings(model: str, quick: bool, work: Path, data: Path, threads: int = 1) -> dict:
    s = dict(QUICK if quick else FULL.get(model, FULL["minilm"]))
    work.mkdir(parents=True, exist_ok=True)
    train = work / f"train-{s['train_rows']}.tsv"
    with open(data / "train.tsv") as f:
        train.write_text("".join(line for _, line in zip(range(s["train_rows"] + 1), f)))
    encoder = model in ENCODERS or "bert" in model
    s.update(model=model, quick=quick, work=str(work), train=str(train), test=str(data / "test.tsv"), seed=0,
             threads=threads, trainable="lora,head", backprop_lr=1e-3, learn=True, encoder=encoder,
             start_head=str(work / "start_head.safetensors"))
    s["bundles"] = {"fp32": str(work / "bundle-fp32"), "int8": str(work / "bundle-int8"),
                    "int8-copies8": str(work / "bundle-int8-copies8")}
    return s


def export_bundles(s: dict, log) -> None:
    for key, extra in (("fp32", ["--quant", "fp32"]), ("int8", ["--quant", "int8"]),
                       ("int8-copies8", ["--quant", "int8", "--copies", "8"])):
        out = Path(s["bundles"][key])
        if (out / "manifest.json").is_file():
            continue
        log(f"bench: exporting {s['model']} {key} -> {out}")
        cmd = [sys.executable, "-m", "zoedge", "export", s["model"], "--out", str(out), "--max-length",
               str(s["max_length"]), "--trainable", s["trainable"], "--force", *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run_worker(name: str, settings_file: Path, out: Path, timeout: float, log) -> dict:
    log(f"bench: {name} ...")
    threads = json.loads(settings_file.read_text())["threads"]
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "bench.sidebyside.worker", name, "--settings", str(settings_file),
                            "--json", str(out)], capture_output=True, text=True, timeout=timeout,
                           env=thread_env(threads), cwd=bench.REPO)  # settings paths are absolute
        if not out.is_file():
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            return {"contender": name, "ok": False, "reason": f"worker exited {p.returncode}: {tail[:300]}"}
        row = json.loads(out.read_text())
        if not row.get("ok"):
            (out.with_suffix(".stderr")).write_text(p.stderr)
    except subprocess.TimeoutExpired:
        row = {"contender": name, "ok": False, "reason": f"timed out after {timeout:.0f} s"}
    log(f"bench: {name} done in {time.perf_counter() - t:.0f}s: "
        + (f"peak {row.get('peak_rss_mb')} MB, step {row.get('step_ms') or row.get('forward_ms')} ms"
           if row.get("ok") else f"FAILED {row.get('reason')}"))
    return row


def run_model(model: str, quick: bool, work: Path, data: Path, only: list[str] | None, threads: int = 1,
              log=print) -> dict:
    work, data = work.resolve(), data.resolve()  # the workers run in the repository root
    s = settings(model, quick, work, data, threads)
    names = [n for n in ORDER if not only or n in only]
    t0 = time.time()
    rows: dict[str, dict] = {}
    try:
        export_bundles(s, log)
    except subprocess.CalledProcessError as e:
        reason = f"export failed: {e}"
        return {"settings": s, "rows": {n: {"contender": n, "ok": False, "reason": reason} for n in names}}
    sf = work / "settings.json"
    rows_dir = work / "rows"
    shutil.rmtree(rows_dir, ignore_errors=True)
    rows_dir.mkdir()
    if default_recipe(Manifest.load(s["bundles"]["int8"])).get("head_init") != "lp":
        s["start_head"] = None  # the default recipe starts from the exported head (a decoder's zero-shot prompt)
    if s["start_head"]:  # the shared start: a linear-probe head on fp32 features (numpy), as the trainer fits it
        sf.write_text(json.dumps(s))
        head = run_worker("start-head", sf, rows_dir / "start-head.json", 1800, log)
        s["start_head_row"] = head
        s["prompt"] = head.get("prompt")
        if not head.get("ok"):
            s["start_head"] = None
    sf.write_text(json.dumps(s))
    for n in names:
        rows[n] = run_worker(n, sf, rows_dir / f"{n}.json", 2400, log)
    return {"settings": s, "rows": rows, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
            "seconds": round(time.time() - t0, 1)}


def main(quick: bool = False, models: list[str] | None = None, only: list[str] | None = None,
         data: Path | None = None, work: Path | None = None, results: Path | None = None, threads: int = 1,
         docs: Path | None = None, log=print) -> list[Path]:
    """Every model's run: RESULTS/[quick-]MODEL.json and its plots, then DOCS/benchmarks[-quick].md over every
    model's latest results in RESULTS. Defaults are in the checkout: ../shared/data/sst2 (or $ZOEDGE_SST2),
    out/bench, bench/results and docs; with `quick`, tiny-bert and WORK/quick-results for both outputs.
    Returns the files written."""
    from bench.sidebyside.report import markdown, plots, write_json

    data = data or bench.SST2
    for f in ("train.tsv", "test.tsv"):
        if not (data / f).is_file():
            raise ZoedgeError(f"--data {data}: no {f}")
    models = models or (["tiny-bert"] if quick else ["minilm", "smollm2-135m"])
    if only and set(only) - set(ORDER):
        raise ZoedgeError(f"bad --only: choose from {', '.join(ORDER)}")
    work = work or bench.WORK / "bench"
    results = results or (work / "quick-results" if quick else bench.RESULTS)
    docs = docs or (results if quick else bench.REPO / "docs")
    prefix = "quick-" if quick else ""
    written = []
    for model in models:
        res = run_model(model, quick, work / f"{prefix}{model}", data, only, threads, log)
        res["plots"] = plots(res, docs)
        written.append(results / f"{prefix}{model}.json")
        write_json(res, written[-1])
        log(f"bench: wrote {written[-1]}")
    # The table covers every model's latest results in the directory, not only this run's.
    found = sorted(p for p in results.glob(f"{prefix}*.json") if quick or not p.name.startswith("quick-"))
    docs_list = [d for d in (json.loads(p.read_text()) for p in found) if "rows" in d and "settings" in d]
    docs_list.sort(key=lambda d: (d["settings"]["model"] != "minilm", d["settings"]["model"]))
    written.append(docs / ("benchmarks-quick.md" if quick else "benchmarks.md"))
    kept = ""  # hand-written sections after the marker (profiles) survive a regeneration
    if written[-1].is_file() and HAND_WRITTEN in written[-1].read_text():
        kept = written[-1].read_text().split(HAND_WRITTEN, 1)[1]
    written[-1].write_text(markdown(docs_list).rstrip("\n") + "\n\n" + HAND_WRITTEN + kept if kept else markdown(docs_list))
    log(f"bench: wrote {written[-1]}")
    return written
