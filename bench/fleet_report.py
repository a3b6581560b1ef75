"""The fleet simulation's plot and table (`python -m bench.fleet_sim report`), from bench/results/fleet/*.json."""

from __future__ import annotations

import json
from pathlib import Path

NAMES = {"seed-pool": "seed-pool ZO", "fedavg": "FedAvg of adapters", "single": "single device"}


def load(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]


def kb(n: float | None) -> str:
    return "" if n is None else f"{n / 1000:,.1f} KB"


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def table(doc: dict) -> str:
    """One task: accuracy per round per contender, then bytes per device per round and the goal's test."""
    rounds = doc["rounds"]
    n = len(rounds["seed-pool"])
    lines = [f"**{doc['task']}** ({len(doc['labels'])} classes; {doc['settings']['devices']} devices, "
             f"{doc['settings']['per_round']} per round, "
             f"{sum(doc['device_examples']):,} training rows, {min(doc['device_examples'])}–"
             f"{max(doc['device_examples'])} per device; test {doc['test']}; the bundle's own head "
             f"{100 * doc['bundle_head_accuracy']:.1f}%)", "",
             "| round | " + " | ".join(NAMES[c] for c in NAMES) + " | seed-pool − FedAvg (paired SE) |",
             "|---:|" + "---:|" * (len(NAMES) + 1)]
    for i in range(n):
        d = doc["difference"][i]
        lines.append(f"| {i + 1} | " + " | ".join(f"{100 * rounds[c][i]['accuracy']:.1f}%" for c in NAMES)
                     + f" | {100 * d['seed_pool_minus_fedavg']:+.1f} ({100 * d['paired_se']:.1f}) |")
    sp, fa = rounds["seed-pool"], rounds["fedavg"]
    lines += ["", "| bytes per device per round (mean over rounds) | seed-pool ZO | FedAvg of adapters | ratio |",
              "|---|---:|---:|---:|"]
    pairs = [("upload, as `zoedge push` sends it (tar)", "upload_bytes", "upload_bytes"),
             ("upload, gzipped", "upload_bytes_gzip", "upload_bytes_gzip"),
             ("download, as `zoedge pull` gets it (the stored global)", "download_bytes", "download_bytes"),
             ("download, coefficients + start only, gzipped (not served today)",
              "download_coefficients_only_bytes_gzip", "download_bytes_gzip"),
             ("**total today** (tar up + pull down)", "bytes_per_device", "bytes_per_device"),
             ("**total lean** (gzip up + coefficients-only gzip down; FedAvg gzip both)", "bytes_per_device_lean",
              None)]
    for label, ks, kf in pairs:
        a = mean(sp, ks)
        b = mean(fa, kf) if kf else mean(fa, "upload_bytes_gzip") + mean(fa, "download_bytes_gzip")
        lines.append(f"| {label} | {kb(a)} | {kb(b)} | 1/{b / a:.0f} |")
    lines += ["", f"FedAvg's agent push (trajectory format, the patch rebased onto the bundle) averaged "
              f"{kb(mean(fa, 'upload_trajectory_bytes'))}; a seed-pool patch in adapter format "
              f"{kb(mean(sp, 'upload_adapter_bytes'))}. Seconds per device per round (training only, mean): "
              + ", ".join(f"{NAMES[c]} {mean(rounds[c], 'train_seconds') / len(rounds[c][0]['devices']):.1f} s"
                          for c in NAMES) + "."]
    return "\n".join(lines)


def plot(docs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(5.2 * len(docs), 3.8), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        for c, style in zip(NAMES, ("o-", "s--", "^:")):
            rows = doc["rounds"][c]
            ax.plot([r["round"] for r in rows], [100 * r["accuracy"] for r in rows], style, label=NAMES[c])
        s = doc["settings"]
        ax.set_title(f"{doc['task']}: {s['devices']} devices ({s['per_round']} per round), Dirichlet α={s['alpha']}, "
                     f"{s['steps']} ZO steps x {s['batch']}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(f"test accuracy (%, {doc['test']} items)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path, plot_path: Path | None) -> str:
    docs = load(results)
    if not docs:
        from zoedge.errors import ZoedgeError

        raise ZoedgeError(f"fleet: no results in {results} (run `python -m bench.fleet_sim` first)")
    if plot_path is not None:
        plot(docs, plot_path)
    return "\n\n".join(table(d) for d in docs)
