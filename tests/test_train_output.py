"""What `zoedge train` prints (issue 15): the last line separates the head start's gain from the ZO steps', a bar on a
terminal once a run lasts a few seconds, plain periodic lines in a log, and a --plot with loss, accuracy, the start
and head-start levels and the kept step."""

from __future__ import annotations

import io
import json

from conftest import run_cli
from runtime_helpers import write_sentiment
from zoedge.runtime.progress import TrainProgress, plot_history, summary_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(total: int, eval_every: int = 0) -> list[dict]:
    out = []
    for step in range(1, total + 1):
        r = {"step": step, "loss": 0.7 - step * 0.001, "lr": 1e-3, "total": total, "rss_mb": 100.0}
        if eval_every and step % eval_every == 0:
            r["eval_accuracy"] = 0.6 + step * 0.001
        out.append(r)
    return out


def test_summary_line_says_start_head_start_end_and_which_step_was_kept():
    r = {"steps": 0, "steps_run": 100, "seconds": 114.2, "peak_rss_mb": 230.0, "eval_accuracy_start": 0.59,
         "eval_accuracy_head_start": 0.8267, "eval_accuracy": 0.8267}
    line = summary_line("p1", r)
    assert "0.5900 at start -> 0.8267 head start -> 0.8267 after ZO" in line
    assert "kept step 0 of 100 run" in line and "head start +0.2367, ZO steps +0.0000" in line
    assert line.startswith("wrote p1: ") and "114s" in line and "230MB" in line


def test_summary_line_without_eval_or_head_start():
    line = summary_line("p", {"steps": 50, "steps_run": 50, "seconds": 3, "peak_rss_mb": 90, "eval_accuracy": None,
                              "eval_accuracy_start": None, "eval_accuracy_head_start": None})
    assert "50 ZO steps run, the last kept (no --eval: nothing measured)" in line
    line = summary_line("p", {"steps": 30, "steps_run": 50, "seconds": 3, "peak_rss_mb": 90, "eval_accuracy": 0.7,
                              "eval_accuracy_start": 0.6, "eval_accuracy_head_start": None})
    assert "0.6000 at start -> 0.7000 after ZO (kept step 30 of 50 run; ZO steps +0.1000)" in line


def test_plain_lines_when_not_a_terminal_even_without_eval():
    buf = io.StringIO()
    with TrainProgress(file=buf, terminal=False, interval=3600) as p:
        for r in records(40):
            p.update(r)
    lines = buf.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 1/40", "step 40/40"]  # first and last, no eval
    buf = io.StringIO()
    with TrainProgress(file=buf, terminal=False, interval=0) as p:
        for r in records(5):
            p.update(r)
    assert len(buf.getvalue().splitlines()) == 5  # one per interval (here: every step)
    buf = io.StringIO()
    with TrainProgress(file=buf, terminal=False, interval=3600) as p:
        for r in records(30, eval_every=10):
            p.update(r)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4 and "eval acc 0.6100" in lines[1] and "\x1b" not in buf.getvalue()
    assert len(p.records) == 30 and p.records[9]["eval_accuracy"] == 0.61


def test_a_bar_on_a_terminal_once_the_run_lasts_a_few_seconds():
    buf = io.StringIO()
    with TrainProgress(file=buf, terminal=True, delay=0) as p:
        for r in records(20):
            p.update(r)
    assert "20/20" in buf.getvalue() and "loss" in buf.getvalue()
    buf = io.StringIO()
    with TrainProgress(file=buf, terminal=True, delay=3600) as p:  # a short run: no bar
        for r in records(20):
            p.update(r)
    assert "20/20" not in buf.getvalue()


def test_plot_has_loss_accuracy_levels_kept_step_and_title(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **kw):
        saved.append(fig)
        return real_savefig(fig, *a, **kw)

    plt.Figure.savefig = spy
    try:
        history = [{"step": 0, "eval_accuracy": 0.8}, {"step": 10, "eval_accuracy": 0.81},
                   {"step": 20, "eval_accuracy": 0.82}]
        result = {"steps": 20, "steps_run": 20, "eval_accuracy_start": 0.59, "eval_accuracy_head_start": 0.8}
        plot_history(history, tmp_path / "c.png", steps=records(20), result=result, title="zoedge train b on d.tsv")
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    fig = saved[0]
    assert fig.get_suptitle() == "zoedge train b on d.tsv"
    loss_ax, eval_ax = fig.axes
    assert loss_ax.get_ylabel() == "loss" and len(loss_ax.lines[0].get_xdata()) == 20
    labels = [t.get_text() for t in eval_ax.get_legend().get_texts()]
    assert any(t.startswith("start 0.59") for t in labels) and any(t.startswith("head start 0.80") for t in labels)
    assert any(t.startswith("kept step 20") for t in labels)
    lo, hi = eval_ax.get_ylim()
    assert lo < 0.59 and hi > 0.82  # the start level is on the chart, not zoomed away


def test_train_cli_prints_progress_lines_and_the_honest_last_line(tiny_bert_bundle, tmp_path):
    train = write_sentiment(tmp_path / "train.tsv", 80, seed=1)
    dev = write_sentiment(tmp_path / "dev.tsv", 40, seed=2)
    p = run_cli("train", tiny_bert_bundle, "--data", train, "--out", tmp_path / "p", "--steps", "12",
                "--eval", dev, "--eval-every", "6", "--plot", tmp_path / "c.png", check=True)
    last = p.stdout.strip().splitlines()[-1]
    assert " at start -> " in last and " head start -> " in last and " after ZO (" in last, last
    assert "step 1/12" in p.stderr and "step 6/12" in p.stderr and "step 12/12" in p.stderr
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    p = run_cli("train", tiny_bert_bundle, "--data", train, "--out", tmp_path / "q", "--steps", "5", check=True)
    assert "step 1/5" in p.stderr and "step 5/5" in p.stderr  # no --eval: still not silent
    assert "5 ZO steps run, the last kept (no --eval" in p.stdout
    p = run_cli("train", tiny_bert_bundle, "--data", train, "--out", tmp_path / "r", "--steps", "3", "--json",
                check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"steps", "steps_run", "eval_accuracy_start", "eval_accuracy_head_start", "eval_accuracy"} <= set(r)
