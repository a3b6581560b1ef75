"""The fleet simulation's plot and table (`python -m bench.fleet_sim report`), from bench/results/fleet/*.json."""

from __future__ import annotations

import json
from pathlib import Path

NAMES = {"seed-pool": "seed-pool ZO", "fedavg": "FedAvg of adapters", "single": "single device"}


def load(results: Path) -> dict[str, list[dict]]:
    """{task: [the main run (TASK.json), then its replicates (TASK-tN.json, other training seeds)]}."""
    out: dict[str, list[dict]] = {}
    key = lambda p: (p.stem.split("-t")[0] != "sst2", p.stem.split("-t")[0], "-t" in p.stem, p.stem)  # noqa: E731
    for p in sorted(Path(results).glob("*.json"), key=key):
        out.setdefault(p.stem.split("-t")[0], []).append(json.loads(p.read_text()))
    return {t: runs for t, runs in out.items() if runs[0]["settings"].get("train_seed", 0) == 0}


def kb(n: float | None) -> str:
    return "" if n is None else f"{n / 1000:,.1f} KB"


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def table(doc: dict) -> str:
    """One task: accuracy per round per contender, then bytes per device per round and the goal's test."""
    rounds, s = doc["rounds"], doc["settings"]
    ex = doc["device_examples"]
    start = f"{doc['start']} head" + (f" fitted on {doc['server_rows']} server rows" if doc["server_rows"] else "")
    lines = [f"**{doc['task']}** ({len(doc['labels'])} classes; {s['devices']} devices, {s['per_round']} per round, "
             f"{sum(ex):,} training rows, {min(ex)}–{max(ex)} per device; test {doc['test']}; round 0 = the start, "
             f"{start})", "",
             "| round | " + " | ".join(NAMES[c] for c in NAMES) + " | seed-pool − FedAvg (paired SE) |",
             "|---:|" + "---:|" * (len(NAMES) + 1)]
    diff = {d["round"]: d for d in doc["difference"]}
    for i, row in enumerate(rounds["seed-pool"]):
        d = diff.get(row["round"])
        lines.append(f"| {row['round']} | " + " | ".join(f"{100 * rounds[c][i]['accuracy']:.1f}%" for c in NAMES)
                     + (f" | {100 * d['seed_pool_minus_fedavg']:+.1f} ({100 * d['paired_se']:.1f}) |" if d else " | |"))
    sp, fa = rounds["seed-pool"][1:], rounds["fedavg"][1:]
    lines += ["", "| bytes per device per round (mean over rounds) | seed-pool ZO | FedAvg of adapters | ratio |",
              "|---|---:|---:|---:|"]
    pairs = [("upload (`zoedge push`: coefficients, gzipped / adapter, tar)", "upload_bytes", "upload_bytes"),
             ("download (seed-pool: `pull --format coefficients`, gzipped; FedAvg: `pull`, tar)", "download_bytes",
              "download_bytes"),
             ("**total**", "bytes_per_device", "bytes_per_device"),
             ("FedAvg gzipped both ways too", "bytes_per_device", None),
             ("what-if: seed-pool without the head start either way (not implemented)", "no_start", "bytes_per_device"),
             ("seed-pool pulling the whole stored global (`pull`, no --format)", None, "bytes_per_device")]
    for label, ks, kf in pairs:
        if ks == "no_start":
            a = mean(sp, "upload_no_start_bytes") + mean(sp, "download_no_start_bytes")
        else:
            a = mean(sp, ks) if ks else mean(sp, "upload_bytes") + mean(sp, "download_whole_bytes")
        b = mean(fa, kf) if kf else mean(fa, "upload_bytes_gzip") + mean(fa, "download_bytes_gzip")
        lines.append(f"| {label} | {kb(a)} | {kb(b)} | 1/{b / a:.0f} |")
    lines += ["", f"FedAvg's agent push (trajectory format, the patch rebased onto the bundle: its start carries the "
              f"global's tensors) averaged {kb(mean(fa, 'upload_trajectory_bytes'))}. Seconds per device per round "
              "(training, mean): " + ", ".join(
                  f"{NAMES[c]} {mean(rounds[c][1:], 'train_seconds') / len(rounds[c][1]['devices']):.1f} s"
                  for c in NAMES) + "."]
    return "\n".join(lines)


def replicates(runs: list[dict]) -> str:
    """Training-seed spread: per run, the last round's accuracy and the mean over rounds 1..R per fleet."""
    if len(runs) < 2:
        return ""
    parts = []
    for doc in runs:
        sp, fa = doc["rounds"]["seed-pool"][1:], doc["rounds"]["fedavg"][1:]
        diff = [d["seed_pool_minus_fedavg"] for d in doc["difference"]]
        parts.append(f"training seed {doc['settings'].get('train_seed', 0)}: last round seed-pool "
                     f"{100 * sp[-1]['accuracy']:.1f}% / FedAvg {100 * fa[-1]['accuracy']:.1f}%, mean over rounds "
                     f"{100 * mean(sp, 'accuracy'):.1f}% / {100 * mean(fa, 'accuracy'):.1f}% (difference "
                     f"{100 * sum(diff) / len(diff):+.1f})")
    return "Replicates (same split, start and device samples; other ZO directions and minibatches): " + \
        "; ".join(parts) + "."


def plot(runs: list[list[dict]], path: Path) -> None:
    """One panel per task: accuracy per round of the three contenders (replicates faint, unlabelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.8), squeeze=False)
    for ax, task_runs in zip(axes[0], runs):
        doc = task_runs[0]
        for c, style, color in zip(NAMES, ("o-", "s--", "^:"), ("C0", "C1", "C2")):
            for i, run in enumerate(task_runs):
                rows = run["rounds"][c]
                ax.plot([r["round"] for r in rows], [100 * r["accuracy"] for r in rows], style, color=color,
                        label=None if i else NAMES[c], alpha=1.0 if i == 0 else 0.35, markersize=None if i == 0 else 3)
        s = doc["settings"]
        ax.set_title(f"{doc['task']}: {s['devices']} devices ({s['per_round']} per round), Dirichlet α={s['alpha']}, "
                     f"{s['steps']} ZO steps x {s['batch']}", fontsize=9)
        ax.set_xlabel("round (0: the shared start)" + (f"; faint: {len(task_runs) - 1} other training seed(s)"
                                                        if len(task_runs) > 1 else ""), fontsize=8)
        ax.set_ylabel(f"test accuracy (%, {doc['test']} items)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path, plot_path: Path | None) -> str:
    runs = load(results)
    docs = [r[0] for r in runs.values()]
    if not docs:
        from zoedge.errors import ZoedgeError

        raise ZoedgeError(f"fleet: no results in {results} (run `python -m bench.fleet_sim` first)")
    if plot_path is not None:
        plot(list(runs.values()), plot_path)
    return "\n\n".join(table(r[0]) + ("\n\n" + replicates(r) if len(r) > 1 else "") for r in runs.values())
