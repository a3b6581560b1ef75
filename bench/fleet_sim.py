"""Fleet simulation (issue 16): N devices on a non-IID split, R rounds, three contenders on one compute budget.

  python -m bench.fleet_sim [--tasks sst2,bbc] [--devices 20] [--per-round 6] [--rounds 8] [--steps 20] ...
  python -m bench.fleet_sim report        # the plot (docs/fleet_sim.png) and the markdown table, from the JSON

Every device trains with zoedge's own trainer (`zoedge.runtime.loop.train`), in this process, on its share of the
task's training pool: a Dirichlet(alpha) split over labels (Hsu et al. 2019), seeded, redrawn until every device
holds at least MIN_EXAMPLES. Each round --per-round of the devices (a seeded sample, the same for both fleets) take
--steps ZO steps each (batch --batch) from the current global model.

Every contender starts from one round-0 global: the bundle's trainables with a linear-probe head that the server
fits on a few labelled rows per class (`--start probe`, the trainer's own `fit_probe_head`; those rows are kept out
of the devices' data), or the bundle's own head (`--start bundle`). Then, per round:

* seed-pool: `train --seed-pool K --seed-pool-from GLOBAL` (the start travels as its start.safetensors); the server's
  aggregation is `zoedge.runtime.seedpool.average` (examples-weighted mean of the coefficient vectors and head
  starts, the tensors rebuilt from the pool);
* fedavg: ordinary ZO (its own direction stream) on the global's tensors (`train` on
  `zoedge.device.rebase.derive_bundle(bundle, GLOBAL)`, then `rebase_patch`, as the agent does); the server's
  aggregation is `zoedge.server.aggregate.fedavg` of the devices' adapters (examples-weighted);
* single: device 0 alone, --steps per round for R rounds (what one fleet device takes over the run if it is in
  every round), on its own data, continuing its own patch each round (derive_bundle); no averaging.

The global of a round is written with `zoedge.runtime.patch.write_patch`, as `POST /v1/bundles/{id}/aggregate`
writes it. Bytes are the archives zoedge builds: an upload is `Outbox.enqueue_patch(patch, format)` (what `zoedge
push --format F` sends: coefficients for seed-pool, gzipped; adapter for fedavg), a download is the global packed
as the server serves it: `?format=coefficients` (gzipped; what the agent of a seed-pool fleet pulls) for seed-pool,
the whole stored directory (`zoedge pull`) for fedavg. Accuracy is the global model's on the task's test set (capped
at --test-cap), with a paired standard error over test items for the seed-pool - fedavg difference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench
from bench import SST2

RESULTS = bench.RESULTS / "fleet"
WORK = bench.WORK / "fleet"
CONTENDERS = ("seed-pool", "fedavg", "single")
MIN_EXAMPLES = 10


# ---- the split -------------------------------------------------------------------------------------------------


def dirichlet_split(labels: list[str], classes: list[str], devices: int, alpha: float, seed: int,
                    min_examples: int = MIN_EXAMPLES) -> list[list[int]]:
    """Row indices per device: each class's rows (shuffled) cut by proportions ~ Dirichlet(alpha), redrawn (up to
    100 times) until every device holds at least min_examples."""
    from zoedge.errors import ZoedgeError

    rng = np.random.Generator(np.random.PCG64(seed))
    y = np.asarray([classes.index(lab) for lab in labels])
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in range(len(classes)):
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha)))[:-1] * len(rows)).astype(int)
            for d, chunk in enumerate(np.split(rows, cuts)):
                parts[d] += chunk.tolist()
        if min(len(p) for p in parts) >= min_examples:
            return [sorted(p) for p in parts]
    raise ZoedgeError(f"fleet: cannot give {devices} devices {min_examples} examples each from {len(labels)} rows")


# ---- wire bytes ------------------------------------------------------------------------------------------------


def upload_bytes(patch_dir: Path, fmt: str) -> tuple[int, int]:
    """(the size of the archive `zoedge push --format fmt` queues and sends (the outbox entry), that archive
    gzipped with mtime 0, unless it already is: the outbox gzips coefficients uploads)."""
    from zoedge.device.outbox import Outbox

    with tempfile.TemporaryDirectory() as tmp:
        box = Outbox(Path(tmp))
        entry = box.enqueue_patch(patch_dir, fmt)
        body = box.archive_path(entry.sha256).read_bytes()
        return entry.bytes, entry.bytes if body[:2] == b"\x1f\x8b" else len(gzip.compress(body, mtime=0))


def archive_bytes(patch_dir: Path, fmt: str | None = None, compress: bool = False,
                  drop: tuple[str, ...] = ()) -> tuple[int, int]:
    """(the packed size of the whole patch directory (fmt None: what the server stores and `zoedge pull` gets) or
    of one format's files (compress: gzipped, as `zoedge pull --format coefficients` gets them) less `drop`, that
    gzipped)."""
    from zoedge.transfer import format_files, pack

    with tempfile.TemporaryDirectory() as tmp:
        names = [n for n in format_files(patch_dir, fmt) if n not in drop] if fmt else None
        size = pack(patch_dir, Path(tmp) / "p.tar", names, compress)[1]
        body = (Path(tmp) / "p.tar").read_bytes()
        return size, size if compress else len(gzip.compress(body, mtime=0))


def wire_bytes(uploads: list[dict], down: dict) -> dict:
    """A round's bytes per device, each measure as sent and gzipped (uploads averaged over the devices);
    bytes_per_device = upload + download."""
    row = {}
    for key in uploads[0]:
        row[f"{key}_bytes"] = int(np.mean([u[key][0] for u in uploads]))
        row[f"{key}_bytes_gzip"] = int(np.mean([u[key][1] for u in uploads]))
    for key, (tar, gz) in down.items():
        row[f"{key}_bytes"], row[f"{key}_bytes_gzip"] = tar, gz
    row["bytes_per_device"] = row["upload_bytes"] + row["download_bytes"]
    return row


# ---- the global model of a round ------------------------------------------------------------------------------


def write_global(out: Path, m, tensors: dict, patches: list[Path], weights: list[float], version: int,
                 start: dict | None = None, coefficients=None, pool: dict | None = None) -> Path:
    """A global patch as the server's aggregate writes it (kind global, empty trajectory, mean start/vector)."""
    from zoedge.patchdoc import PatchDoc
    from zoedge.runtime.patch import write_patch
    from zoedge.runtime.zo import ZOConfig

    cfg = ZOConfig()
    prompts = {PatchDoc.load(p).prompt_template for p in patches} or {None}
    meta = {"kind": "global", "version": version, "parents": [p.name for p in patches], "steps": 0, "run_seed": 0,
            "zo": cfg.to_dict(), "examples": int(sum(weights)), "metrics": {}, "prompt_template": prompts.pop()}
    meta.update(pool or {})
    write_patch(out, m, tensors, np.zeros((0, cfg.perturbations + 1), np.float32), start or {}, meta, coefficients)
    return out


class Scorer:
    """The test set's accuracy for given trainable tensors: one forward session, rows sorted by length (less
    padding; the accuracy does not depend on the order)."""

    def __init__(self, bundle_dir: Path, test_tsv: Path, batch: int = 32):
        from zoedge.runtime.bundle import Bundle
        from zoedge.runtime.evaluator import Evaluator, load_dataset
        from zoedge.runtime.forward import open_forward

        self.bundle = Bundle.open(bundle_dir)
        self.tensors = self.bundle.initial_trainables()
        self.ev = Evaluator(self.bundle, open_forward(self.bundle, self.tensors), batch)
        self.data = load_dataset(test_tsv, self.bundle.manifest)
        rows = self.bundle.encoder.token_ids(self.data.texts)
        self.order = np.argsort([len(r) for r in rows], kind="stable")

    def correct(self, tensors: dict) -> np.ndarray:
        from zoedge.manifest import OUTPUT_LOGITS

        for k, v in tensors.items():
            np.copyto(self.tensors[k], v)
        (logits,) = self.ev.outputs(self.data, (OUTPUT_LOGITS,), self.order)
        return (logits.argmax(1) == self.data.labels[self.order]).astype(np.int8)


# ---- one task ----------------------------------------------------------------------------------------------------


def device_cfg(a, seed: int, **extra):
    from zoedge.runtime.config import TrainConfig

    return TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, eps=a.eps, seed=seed, keep="last",
                       checkpoint_every=0, head_init="none", head_lr=0.0, **extra)  # both arms: the head in ZO


def probe_head(bundle_dir: Path, rows_tsv: Path, seed: int, log) -> dict:
    """The trainer's own linear-probe head start (`fit_probe_head`, warm-start L2 floor) fitted on rows_tsv."""
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.evaluator import Evaluator, load_dataset
    from zoedge.runtime.forward import open_forward
    from zoedge.runtime.head_start import fit_probe_head

    b = Bundle.open(bundle_dir)
    t = b.initial_trainables()
    ev = Evaluator(b, open_forward(b, t), 16)
    start, _ = fit_probe_head(b.manifest, b, ev, load_dataset(rows_tsv, b.manifest), t, 1 << 30, seed, [], log,
                              warm_start=True)
    return start


def round_zero(a, work: Path, m, initial: dict, start: dict, examples: int) -> dict[str, Path]:
    """The global every contender starts from: the bundle's trainables with the start (head) laid over them; for
    the seed-pool fleet a seed-pool patch with a zero vector (its start travels in start.safetensors)."""
    from zoedge.runtime.seedpool import pool_id

    tensors = {**initial, **start}
    out = {c: write_global(work / c / "r00" / "global", m, tensors, [], [examples], 0) for c in CONTENDERS
           if c != "seed-pool"}
    out["seed-pool"] = write_global(work / "seed-pool" / "r00" / "global", m, tensors, [], [examples], 0, start,
                                    np.zeros(a.seed_pool, np.float32),
                                    {"seed_pool_id": pool_id(m), "seed_pool_k": a.seed_pool})
    return out


def run_task(a, task_name: str, bundle_dir: Path, log) -> dict:
    from zoedge import datasets
    from zoedge.device.rebase import derive_bundle, rebase_patch
    from zoedge.patchdoc import START_FILE, PatchDoc
    from zoedge.runtime import seedpool
    from zoedge.runtime.bundle import Bundle
    from zoedge.runtime.loop import train
    from zoedge.runtime.patch import load_patch_tensors
    from zoedge.server.aggregate import fedavg

    t_task = time.perf_counter()
    task = datasets.load_task(task_name, a.sst2)
    work = a.work / (f"{task_name}-t{a.train_seed}" if a.train_seed else task_name)
    shutil.rmtree(work, ignore_errors=True)
    pool, held = task.pool, []
    if a.start == "probe":  # the server's few labelled rows (k per class), kept out of the devices' data
        held = datasets.kshot(task, a.probe_k, datasets.SEEDS[0]).train
        taken = {t for t, _ in held}
        pool = [row for row in task.pool if row[0] not in taken]
    parts = dirichlet_split([lab for _, lab in pool], task.labels, a.devices, a.alpha, a.seed)
    data = [datasets.write_tsv(work / "devices" / f"dev{d:02d}.tsv", [pool[i] for i in p])
            for d, p in enumerate(parts)]
    test = task.test[:a.test_cap]
    test_tsv = datasets.write_tsv(work / "test.tsv", test)
    counts = [[sum(pool[i][1] == c for i in p) for c in task.labels] for p in parts]
    m = Bundle.open(bundle_dir).manifest
    initial = Bundle.open(bundle_dir, check_files=False).initial_trainables()
    tester = Scorer(bundle_dir, test_tsv)
    quiet = lambda _msg: None  # noqa: E731
    start = probe_head(bundle_dir, datasets.write_tsv(work / "server.tsv", held), a.seed, quiet) if held else {}
    glob = round_zero(a, work, m, initial, start, max(len(held), 1))
    start_correct = tester.correct({**initial, **start})
    log(f"{task_name}: {a.devices} devices, {len(pool)} pool rows, sizes {min(map(len, parts))}.."
        f"{max(map(len, parts))}; test {len(test)}; start ({a.start}, {len(held)} rows) {start_correct.mean():.3f}")

    pick = np.random.Generator(np.random.PCG64([a.seed, 0xF1EE7]))  # who takes part in each round: both fleets
    sample = [sorted(pick.choice(a.devices, size=a.per_round, replace=False).tolist()) for _ in range(a.rounds)]
    rounds: dict[str, list[dict]] = {c: [{"round": 0, "accuracy": round(float(start_correct.mean()), 4)}]
                                     for c in CONTENDERS}
    correct: dict[str, list[np.ndarray]] = {c: [start_correct] for c in CONTENDERS}
    for r in range(1, a.rounds + 1):
        for contender in CONTENDERS:
            t0 = time.perf_counter()
            rdir = work / contender / f"r{r:02d}"
            devices = [0] if contender == "single" else sample[r - 1]
            train_on = bundle_dir  # seed-pool devices continue the global on the bundle itself
            if contender != "seed-pool":
                train_on = derive_bundle(bundle_dir, glob[contender], rdir / "derived")
            patches, weights, wire, train_s = [], [], [], 0.0
            for d in devices:
                out = rdir / f"dev{d:02d}"
                extra = {"seed_pool": a.seed_pool, "seed_pool_from": str(glob[contender])} \
                    if contender == "seed-pool" else {}
                seed = 1000 * r + d + 100_000 * a.train_seed
                res = train(train_on, data[d], out, device_cfg(a, seed, **extra), log=quiet)
                train_s += res["seconds"]
                weights.append(float(len(parts[d])))
                pushed = out
                if contender != "seed-pool":  # as the agent pushes it: re-expressed against the bundle
                    pushed = rdir / f"push{d:02d}"
                    rebase_patch(out, train_on, bundle_dir, pushed)
                patches.append(pushed)
                if contender == "seed-pool":
                    wire.append({"upload": upload_bytes(out, "coefficients"),
                                 "upload_adapter": upload_bytes(out, "adapter"),  # what-if: no head start
                                 "upload_no_start": archive_bytes(out, "coefficients", True, (START_FILE,))})
                elif contender == "fedavg":  # the adapter tensors as trained; the agent's trajectory push
                    wire.append({"upload": upload_bytes(out, "adapter"),
                                 "upload_trajectory": upload_bytes(pushed, "trajectory")})
            gdir = rdir / "global"
            if contender == "seed-pool":
                docs = [PatchDoc.load(p) for p in patches]
                tensors, g_start, c, pool_meta = seedpool.average(m, initial, patches, docs, weights)
                write_global(gdir, m, tensors, patches, weights, r, g_start, c, pool_meta)
                down = {"download": archive_bytes(gdir, "coefficients", compress=True),  # the seed-pool agent's pull
                        "download_whole": archive_bytes(gdir),
                        "download_no_start": archive_bytes(gdir, "coefficients", True, (START_FILE,))}
            else:  # fedavg; single: the one device's patch is its model
                tensors = fedavg([load_patch_tensors(p, m) for p in patches], weights)
                write_global(gdir, m, tensors, patches, weights, r)
                down = {"download": archive_bytes(gdir)}
            glob[contender] = gdir
            ok = tester.correct(tensors)
            correct[contender].append(ok)
            row = {"round": r, "accuracy": round(float(ok.mean()), 4), "devices": devices,
                   "steps_per_device": a.steps, "train_seconds": round(train_s, 1),
                   "seconds": round(time.perf_counter() - t0, 1)}
            if contender != "single":
                row.update(wire_bytes(wire, down))
            rounds[contender].append(row)
            log(f"{task_name} r{r} {contender}: {json.dumps(row)}")
            for p in rdir.iterdir():  # the device patches are measured; the globals stay for the next round
                if p.name != "global":
                    shutil.rmtree(p, ignore_errors=True)
    diffs = []
    for r in range(1, a.rounds + 1):
        d = correct["seed-pool"][r].astype(float) - correct["fedavg"][r].astype(float)
        diffs.append({"round": r, "seed_pool_minus_fedavg": round(float(d.mean()), 4),
                      "paired_se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4),
                      "disagreements": int(np.sum(d != 0))})
    return {"task": task_name, "labels": task.labels, "pool": len(pool), "test": len(test),
            "bundle": str(bundle_dir), "bundle_id": m.bundle_id, "start": a.start, "server_rows": len(held),
            "start_accuracy": round(float(start_correct.mean()), 4),
            "device_examples": [len(p) for p in parts], "device_label_counts": counts,
            "rounds": rounds, "difference": diffs, "seconds": round(time.perf_counter() - t_task, 1),
            "final_correct": {c: "".join(map(str, correct[c][-1].tolist())) for c in CONTENDERS}}


# ---- the command -------------------------------------------------------------------------------------------------


def bundle_for(a, task_name: str, log) -> Path:
    """--bundle TASK=DIR, else the k-shot bench's cached export (re-exported when the exporter changed)."""
    from bench import kshot_setup
    from zoedge import datasets
    from zoedge.errors import ZoedgeError

    if any("=" not in b for b in a.bundle):
        raise ZoedgeError(f"bad --bundle {next(b for b in a.bundle if '=' not in b)!r}: give TASK=DIR")
    given = dict(b.split("=", 1) for b in a.bundle)
    if task_name in given:
        return Path(given[task_name])
    info = kshot_setup.ensure_bundle(kshot_setup.WORK / "bundles", kshot_setup.model_spec(a.model),
                                     datasets.load_task(task_name, a.sst2), a.quant, log)
    return Path(info["path"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", default="run", choices=("run", "report"))
    ap.add_argument("--tasks", default="sst2,bbc")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--bundle", action="append", default=[], help="TASK=DIR: use this bundle instead of exporting")
    ap.add_argument("--sst2", type=Path, default=SST2)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=6, help="devices sampled (seeded) to train in each round")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="ZO steps per device per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--start", choices=("probe", "bundle"), default="probe",
                    help="probe: a linear-probe head fitted by the server on --probe-k rows per class (LM-BFF split, "
                         "seed 13) kept out of the devices' data; bundle: the bundle's own head")
    ap.add_argument("--probe-k", type=int, default=16)
    ap.add_argument("--seed-pool", type=int, default=1024, help="K")
    ap.add_argument("--seed", type=int, default=0, help="the split's (and the round samples') seed")
    ap.add_argument("--train-seed", type=int, default=0,
                    help="> 0: a replicate with other ZO directions and minibatches (same split, samples and start); "
                         "written as TASK-tN.json")
    ap.add_argument("--test-cap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=bench.REPO / "docs" / "fleet_sim.png")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from zoedge.errors import ZoedgeError

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.cmd == "report":
            from bench.fleet_report import report

            print(report(a.results, a.plot))
            return 0
        if a.threads:
            os.environ["ZOEDGE_THREADS"] = str(a.threads)
        if a.devices < 2 or a.rounds < 1 or a.steps < 1 or not 1 <= a.per_round <= a.devices:
            raise ZoedgeError("fleet: need --devices >= 2, --rounds >= 1, --steps >= 1, 1 <= --per-round <= --devices")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "cmd"}
        from bench.kshot_setup import git_state

        for name in a.tasks.split(","):
            bundle_dir = bundle_for(a, name, log)
            t0, load0 = time.process_time(), os.getloadavg()
            doc = run_task(a, name, bundle_dir, log)
            doc.update(settings=settings, cpu_seconds=round(time.process_time() - t0, 1),
                       loadavg=[list(load0), list(os.getloadavg())], git=git_state(),
                       finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            a.results.mkdir(parents=True, exist_ok=True)
            path = a.results / (f"{name}-t{a.train_seed}.json" if a.train_seed else f"{name}.json")
            path.write_text(json.dumps(doc, indent=1) + "\n")
            log(f"{name}: wrote {path} ({doc['seconds']} s, cpu {doc['cpu_seconds']} s)")
    except ZoedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
