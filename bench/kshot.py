"""The few-shot learning benchmark (issue 12): MeZO's k-shot protocol, one resumable cell at a time.

  python -m bench.kshot run --models minilm --tasks sst2,drugs,bbc --k 16 --seeds 13 \
      --contenders zero-shot,lp,zoedge,backprop
  python -m bench.kshot assemble          # table.json, the markdown table (printed, and in docs/learning.md), plots

A cell is (model, task, k, seed, contender); it writes RESULTS/<model>/<task>-k<k>-s<seed>-<contender>.json and
is skipped when that file exists (delete it to rerun). Each cell runs in its own subprocess, so its peak RSS is
its own. A failed cell writes <name>.failed.json (with the reason) and is tried again next time.

Backprop: on seed 13 of each (model, task, k) every point of the lr x batch grid is its own cell
(`backprop-lr3e-04-b8`); the `backprop` cell of seed 13 is the grid point best on validation, and the other
seeds rerun that point. Run seed 13 first (a `run` that includes it orders it first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, SST2, kshot_setup as setup, thread_env
from zoedge import datasets
from zoedge.errors import ZoedgeError

CONTENDERS = ("zero-shot", "lp", "zoedge", "backprop")
GRID_SEED = 13
BACKPROP = dict(steps=1000, eval_every=100, lrs=(1e-4, 3e-4, 1e-3), batches=(4, 8))


def cell_name(task: str, k: int, seed: int, contender: str) -> str:
    return f"{task}-k{k}-s{seed}-{contender}"


def grid_name(lr: float, batch: int) -> str:
    return f"backprop-lr{lr:.0e}-b{batch}"


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# ---- one cell, in its own process --------------------------------------------------------------------------


def cell_main(spec_file: Path) -> int:
    t0 = time.perf_counter()
    spec = json.loads(spec_file.read_text())
    load0 = list(os.getloadavg())
    from bench.kshot_cells import CONTENDERS as RUN
    from zoedge.runtime.memory import peak_rss_mb

    contender = "backprop" if spec["contender"].startswith("backprop") else spec["contender"]
    out = Path(spec["out"])
    try:
        res = RUN[contender](spec)
    except Exception as e:  # the failure file says why; no numbers are made up
        import traceback

        traceback.print_exc()
        _write_json(out.with_suffix(".failed.json"), {"cell": spec["cell"], "ok": False,
                                                       "reason": f"{type(e).__name__}: {str(e)[:400]}"})
        return 1
    doc = {"cell": spec["cell"], "ok": True, "test_accuracy": res.pop("test_accuracy"),
           "val_accuracy": res.pop("val_accuracy"), "seconds": round(time.perf_counter() - t0, 2),
           "peak_rss_mb": round(peak_rss_mb(), 1), "forward_passes": res.pop("forward_passes"),
           "n": {n: _rows(p) for n, p in spec["splits"].items()}, **res,
           "run": {"threads": spec["threads"], "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
                   "torch_imported": "torch" in sys.modules, "bundle": spec["bundle_info"],
                   "splits_sha256": {n: setup.file_sha256(p) for n, p in spec["splits"].items()},
                   "git": spec["git"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}}
    _write_json(out, doc)
    out.with_suffix(".failed.json").unlink(missing_ok=True)
    return 0


def _rows(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


# ---- planning and running cells ------------------------------------------------------------------------------


class Runner:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        # absolute: every cell runs in the repository root
        self.results, self.work, self.cache = (Path(p).resolve() for p in (a.results, a.work, a.cache))
        self.git = setup.git_state()
        self.tasks: dict[str, datasets.Task] = {}
        self.bundles: dict[tuple, dict] = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def task(self, name: str) -> datasets.Task:
        if name not in self.tasks:
            self.tasks[name] = datasets.load_task(name, self.a.sst2)
        return self.tasks[name]

    def bundle(self, model: str, task: str, quant: str) -> dict:
        if self.a.bundle:  # a given bundle (tests): no export, no cache
            path = (self.a.bundle_fp32 if quant == "fp32" and self.a.bundle_fp32 else self.a.bundle).resolve()
            return {"path": str(path), "key": "given", "export_args": None, **setup.bundle_identity(path)}
        key = (model, task, quant)
        if key not in self.bundles:
            self.bundles[key] = setup.ensure_bundle(self.cache, setup.model_spec(model), self.task(task), quant,
                                                    self.log)
        return self.bundles[key]

    def out(self, model: str, name: str) -> Path:
        return self.results / model / f"{name}.json"

    def run_all(self) -> int:
        failed = 0
        seeds = sorted(self.a.seeds, key=lambda s: s != GRID_SEED)  # the grid seed first: others reuse its choice
        for model in self.a.models:
            for task in self.a.tasks:
                for k in self.a.k:
                    for seed in seeds:
                        for contender in self.a.contenders:
                            failed += not self.cell(model, task, k, seed, contender)
        self.log(f"kshot: done ({failed} failed)" if failed else "kshot: done")
        return 1 if failed else 0

    def cell(self, model: str, task: str, k: int, seed: int, contender: str) -> bool:
        name = cell_name(task, k, seed, contender)
        out = self.out(model, name)
        if out.is_file():
            self.log(f"kshot: {model}/{name}: done before, skipped")
            return True
        if contender != "backprop":
            return self.spawn(model, task, k, seed, contender, out, {})
        if seed == GRID_SEED:
            return self.grid(model, task, k, out)
        chosen = self.out(model, cell_name(task, k, GRID_SEED, "backprop"))
        if not chosen.is_file():
            self.log(f"kshot: {model}/{name}: no seed-{GRID_SEED} backprop selection yet ({chosen}); run seed "
                     f"{GRID_SEED} first")
            return False
        sel = json.loads(chosen.read_text())["settings"]
        return self.spawn(model, task, k, seed, "backprop", out, {"lr": sel["lr"], "batch": sel["batch"]})

    def grid(self, model: str, task: str, k: int, out: Path) -> bool:
        """Every grid point on the grid seed, then the `backprop` cell = the best on validation."""
        points = [(lr, b) for b in self.a.backprop_batches for lr in self.a.backprop_lrs]
        ok = True
        for lr, b in points:
            pout = self.out(model, cell_name(task, k, GRID_SEED, grid_name(lr, b)))
            if pout.is_file():
                self.log(f"kshot: {model}/{pout.stem}: done before, skipped")
                continue
            ok &= self.spawn(model, task, k, GRID_SEED, grid_name(lr, b), pout, {"lr": lr, "batch": b})
        if not ok:
            return False
        docs = [json.loads(self.out(model, cell_name(task, k, GRID_SEED, grid_name(lr, b))).read_text())
                for lr, b in points]
        best = max(docs, key=lambda d: (d["val_accuracy"], -d.get("val_loss", 0.0)))  # ties: lower val loss
        summary = [{"lr": d["settings"]["lr"], "batch": d["settings"]["batch"], "val_accuracy": d["val_accuracy"],
                    "val_loss": d.get("val_loss"), "test_accuracy": d["test_accuracy"], "seconds": d["seconds"],
                    "peak_rss_mb": d["peak_rss_mb"]} for d in docs]
        doc = {**best, "cell": {**best["cell"], "contender": "backprop"},
               "grid": {"points": summary, "selected_by": "validation accuracy, ties by lower validation loss",
                        "seconds_all_points": round(sum(d["seconds"] for d in docs), 2)}}
        _write_json(out, doc)
        self.log(f"kshot: {model}/{out.stem}: lr {best['settings']['lr']:g} batch {best['settings']['batch']} "
                 f"(val {best['val_accuracy']:.4f}) of {len(docs)} grid points")
        return True

    def spawn(self, model: str, task: str, k: int, seed: int, contender: str, out: Path, bp: dict) -> bool:
        spec_model = setup.model_spec(model)
        t = self.task(task)
        work = self.work / "cells" / model / out.stem
        work.mkdir(parents=True, exist_ok=True)
        is_bp = contender.startswith("backprop")
        bundle = self.bundle(model, task, "fp32" if is_bp else spec_model.quant)
        spec = {"cell": {"model": model, "task": task, "k": k, "seed": seed, "contender": contender},
                "contender": contender, "model": model, "out": str(out), "work": str(work),
                "splits": setup.split_files(self.work, t, k, seed), "threads": self.a.threads, "git": self.git,
                "bundle": bundle["path"], "bundle_info": {**bundle, "quant": "fp32" if is_bp else spec_model.quant}}
        if is_bp:
            spec["bundle_fp32"] = bundle["path"]
            spec["backprop"] = {"steps": self.a.backprop_steps, "eval_every": self.a.backprop_eval_every, **bp}
        if contender == "zoedge" and self.a.zoedge_steps:
            spec["train_overrides"] = {"steps": self.a.zoedge_steps}
        spec_file = work / "spec.json"
        _write_json(spec_file, spec)
        self.log(f"kshot: {model}/{out.stem} ...")
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "bench.kshot", "cell", "--spec", str(spec_file)], cwd=REPO,
                               env=thread_env(self.a.threads), capture_output=True, text=True,
                               timeout=self.a.timeout)
            (work / "stderr.txt").write_text(p.stderr)
        except subprocess.TimeoutExpired:
            _write_json(out.with_suffix(".failed.json"), {"cell": spec["cell"], "ok": False,
                                                           "reason": f"timed out after {self.a.timeout} s"})
        if not out.is_file():
            reason = "no result"
            failed = out.with_suffix(".failed.json")
            if failed.is_file():
                reason = json.loads(failed.read_text()).get("reason", reason)
            self.log(f"kshot: {model}/{out.stem}: FAILED ({reason}); stderr in {work / 'stderr.txt'}")
            return False
        d = json.loads(out.read_text())
        self.log(f"kshot: {model}/{out.stem}: test {d['test_accuracy']:.4f}, val {d['val_accuracy']:.4f}, "
                 f"{d['seconds']:.0f} s, peak {d['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s wall)")
        return True


# ---- command line ----------------------------------------------------------------------------------------------


def _list(cast):
    return lambda text: [cast(x.strip()) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.kshot", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the cells of a grid (each skipped when its JSON exists)")
    r.add_argument("--models", type=_list(str), default=["minilm"])
    r.add_argument("--tasks", type=_list(str), default=list(datasets.TASKS))
    r.add_argument("--k", type=_list(int), default=[16])
    r.add_argument("--seeds", type=_list(int), default=[GRID_SEED])
    r.add_argument("--contenders", type=_list(str), default=list(CONTENDERS))
    r.add_argument("--backprop-lrs", type=_list(float), default=list(BACKPROP["lrs"]))
    r.add_argument("--backprop-batches", type=_list(int), default=list(BACKPROP["batches"]))
    r.add_argument("--backprop-steps", type=int, default=BACKPROP["steps"])
    r.add_argument("--backprop-eval-every", type=int, default=BACKPROP["eval_every"])
    r.add_argument("--zoedge-steps", type=int, default=0, help="override the recipe's steps (smoke tests only)")
    r.add_argument("--threads", type=int, default=1, help="threads for every engine (1 on a shared machine)")
    r.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per cell")
    r.add_argument("--sst2", type=Path, default=SST2)
    r.add_argument("--results", type=Path, default=setup.RESULTS)
    r.add_argument("--work", type=Path, default=setup.WORK)
    r.add_argument("--cache", type=Path, default=setup.WORK / "bundles")
    r.add_argument("--bundle", type=Path, help="use this bundle instead of the cache (tests)")
    r.add_argument("--bundle-fp32", type=Path, help="with --bundle: the backprop bundle (default: --bundle)")
    c = sub.add_parser("cell", help="run one cell (internal: `run` starts these)")
    c.add_argument("--spec", type=Path, required=True)
    t = sub.add_parser("assemble", help="table.json, the markdown table and plots from the cell JSONs")
    t.add_argument("--results", type=Path, default=setup.RESULTS)
    t.add_argument("--docs", type=Path, default=REPO / "docs", help="where learning.md and the plots are")
    t.add_argument("--no-docs", action="store_true", help="write table.json and table.md only")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "cell":
        return cell_main(a.spec)
    try:
        if a.cmd == "assemble":
            from bench.kshot_table import assemble

            print(assemble(a.results, None if a.no_docs else a.docs))
            return 0
        bad = set(a.contenders) - set(CONTENDERS)
        if bad:
            raise ZoedgeError(f"bad --contenders {','.join(sorted(bad))}: choose from {', '.join(CONTENDERS)}")
        for m in a.models:
            setup.model_spec(m)
        return Runner(a).run_all()
    except ZoedgeError as e:
        print(f"kshot: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
