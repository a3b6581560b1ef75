"""Training progress on stderr (rich) and an optional training-curve PNG (matplotlib, if installed)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from zoedge.errors import ZoedgeError


class TrainProgress:
    def __init__(self) -> None:
        self.console = Console(file=sys.stderr)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                 transient=False, disable=not self.console.is_terminal)
        self.task = None
        self.last_eval = ""

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False, soft_wrap=True)  # one line per message in logs and journals

    def update(self, rec: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("train", total=rec["total"], info="")
        if "eval_accuracy" in rec:
            self.last_eval = f" eval acc {rec['eval_accuracy']:.4f}"
            if not self.console.is_terminal:
                self.log(f"step {rec['step']}/{rec['total']}: loss {rec['loss']:.4f}{self.last_eval}")
        elif "eval_loss" in rec and not self.console.is_terminal:
            self.log(f"step {rec['step']}/{rec['total']}: loss {rec['loss']:.4f} eval loss {rec['eval_loss']:.4f}")
        self.progress.update(self.task, completed=rec["step"], info=f"loss {rec['loss']:.4f}{self.last_eval}")


def plot_history(history: list[dict], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ZoedgeError("--plot needs matplotlib (pip install 'zoedge[plot]')") from None
    steps = [h["step"] for h in history if "eval_accuracy" in h or "eval_loss" in h]
    key = "eval_accuracy" if any("eval_accuracy" in h for h in history) else "eval_loss"
    values = [h[key] for h in history if key in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("ZO step")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
