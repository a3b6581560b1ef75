"""What `zoedge train` shows while it runs and when it ends.

* a rich progress bar on a terminal, once a run has lasted a few seconds (with or without --eval);
* plain lines when stderr is not a terminal (a log file, a journal): every eval, and one every `interval`
  seconds otherwise, so a run without --eval is not silent until its end;
* `summary_line`: the last line, which says what the head start gave and what the ZO steps gave;
* `plot_history`: loss and eval accuracy over the steps, the start and head-start levels, the kept step.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from zoedge.errors import ZoedgeError

BAR_DELAY_S = 2.0  # a run shorter than this shows no bar
LOG_INTERVAL_S = 30.0  # plain lines: at most one per interval between evals


class TrainProgress:
    """on_step / log hooks of runtime.loop.train; keeps every step record (for --plot)."""

    def __init__(self, file: IO[str] | None = None, terminal: bool | None = None, delay: float = BAR_DELAY_S,
                 interval: float = LOG_INTERVAL_S) -> None:
        self.console = Console(file=file or sys.stderr, force_terminal=terminal)
        self.terminal = self.console.is_terminal if terminal is None else terminal
        self.delay, self.interval = delay, interval
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                 transient=False)
        self.task = None
        self.started = False
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.last_eval = ""
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> "TrainProgress":
        self.t0 = self.last_line = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.progress.stop()

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False, soft_wrap=True)  # one line per message in logs and journals

    def update(self, rec: dict) -> None:
        self.records.append({k: v for k, v in rec.items() if isinstance(v, (int, float))})
        now = time.monotonic()
        evaluated = "eval_accuracy" in rec or "eval_loss" in rec
        if "eval_accuracy" in rec:
            self.last_eval = f", eval acc {rec['eval_accuracy']:.4f}"
        elif "eval_loss" in rec:
            self.last_eval = f", eval loss {rec['eval_loss']:.4f}"
        info = f"loss {rec['loss']:.4f}{self.last_eval}"
        if not self.terminal:
            first = len(self.records) == 1
            if first or evaluated or now - self.last_line >= self.interval or rec["step"] == rec["total"]:
                self.last_line = now
                rss = f", {rec['rss_mb']:.0f} MB" if "rss_mb" in rec else ""
                self.log(f"step {rec['step']}/{rec['total']}: {info}{rss}, {now - self.t0:.0f}s")
            return
        if not self.started:
            if now - self.t0 < self.delay:  # a short run shows no bar
                return
            self.progress.start()
            self.started = True
            self.task = self.progress.add_task("train", total=rec["total"], info="")
        self.progress.update(self.task, completed=rec["step"], info=info)


def _acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "?"


def summary_line(out: str | Path, r: dict[str, Any]) -> str:
    """`wrote OUT: eval accuracy 0.5900 at start -> 0.8267 head start -> 0.8300 after ZO (kept step 40 of 100
    run), 114s, peak RSS 230MB`. Without --eval only the steps, which the kept step is, and the cost."""
    kept, ran = r.get("steps"), r.get("steps_run")
    start, head, end = r.get("eval_accuracy_start"), r.get("eval_accuracy_head_start"), r.get("eval_accuracy")
    steps = f"kept step {kept} of {ran} run" if kept != ran else f"{ran} ZO steps run, the last kept"
    if end is None:
        what = f"{steps} (no --eval: nothing measured)"
    else:
        chain = [f"{_acc(start)} at start"] if start is not None else []
        if head is not None:
            chain.append(f"{_acc(head)} head start")
        chain.append(f"{_acc(end)} after ZO" if chain else _acc(end))
        gain = ""
        if head is not None or start is not None:
            base = head if head is not None else start
            gain = f"; ZO steps {end - base:+.4f}"
            if head is not None and start is not None:
                gain = f"; head start {head - start:+.4f}, ZO steps {end - head:+.4f}"
        what = f"eval accuracy {' -> '.join(chain)} ({steps}{gain})"
    rb = f", {r['rollbacks']} rollback(s)" if r.get("rollbacks") else ""
    return f"wrote {out}: {what}, {r.get('seconds', 0):.0f}s{rb}, peak RSS {r.get('peak_rss_mb', 0):.0f}MB"


def plot_history(history: list[dict], path: str | Path, steps: list[dict] | None = None,
                 result: dict[str, Any] | None = None, title: str = "") -> None:
    """Training loss (every step, from `steps`: the on_step records) over eval accuracy (or eval loss) from
    `history`; dashed levels for the eval accuracy at start and after the head start; a marker at the kept step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ZoedgeError("--plot needs matplotlib (pip install 'zoedge[plot]')") from None
    result = result or {}
    steps = [s for s in (steps or []) if isinstance(s.get("loss"), (int, float)) and math.isfinite(s["loss"])]
    key = "eval_accuracy" if any("eval_accuracy" in h for h in history) else "eval_loss"
    evals = [(h["step"], h[key]) for h in history if key in h]
    fig, (ax_loss, ax_eval) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    if steps:
        x = [s["step"] for s in steps]
        y = [s["loss"] for s in steps]
        ax_loss.plot(x, y, lw=0.8, alpha=0.45, label="train loss (minibatch)")
        k = max(1, len(y) // 20)
        if k > 1:
            smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            ax_loss.plot(x, smooth, lw=1.6, label=f"mean of {k}")
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no step records", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if evals:
        ax_eval.plot([s for s, _ in evals], [v for _, v in evals], marker="o", ms=3, label=key.replace("_", " "))
    levels = []
    if key == "eval_accuracy":
        for name, value, style in (("start", result.get("eval_accuracy_start"), ":"),
                                   ("head start", result.get("eval_accuracy_head_start"), "--")):
            if isinstance(value, (int, float)):
                ax_eval.axhline(value, ls=style, color="gray", lw=1, label=f"{name} {value:.4f}")
                levels.append(value)
        values = [v for _, v in evals] + levels
        if values:  # never zoom in so far that the start is off the chart
            lo, hi = min(values), max(values)
            pad = max(0.02, (hi - lo) * 0.15)
            ax_eval.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    kept = result.get("steps")
    if isinstance(kept, int):
        for ax in (ax_loss, ax_eval):
            ax.axvline(kept, color="tab:red", lw=1, alpha=0.7)
        kept_value = next((v for s, v in evals if s == kept), None)
        label = f"kept step {kept}" + (f" ({kept_value:.4f})" if kept_value is not None else "")
        if kept_value is not None:
            ax_eval.plot([kept], [kept_value], marker="*", ms=12, color="tab:red", ls="none", label=label)
        else:
            ax_eval.plot([], [], color="tab:red", label=label)
    ax_eval.set_xlabel("ZO step")
    ax_eval.set_ylabel(key.replace("_", " "))
    ax_eval.grid(alpha=0.3)
    if evals or levels:
        ax_eval.legend(loc="lower right", fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, "no --eval data", ha="center", va="center", transform=ax_eval.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
