"""Small synthetic datasets for runtime tests."""

from __future__ import annotations

import random
from pathlib import Path

GOOD = ["great", "wonderful", "superb", "delightful", "brilliant", "lovely"]
BAD = ["awful", "terrible", "dreadful", "boring", "horrible", "dull"]
FILLER = ["the", "film", "was", "a", "story", "and", "quite", "really", "plot", "acting", "very", "it"]


def write_sentiment(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable toy task: the label is whether the sentence holds a positive or a negative word."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(GOOD if label else BAD)]
        rng.shuffle(words)
        lines.append(" ".join(words) + f"\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_toy_split(d: Path, n_train: int, n_dev: int) -> tuple[Path, Path]:
    """A train and a dev file of the toy task, from different seeds."""
    return write_sentiment(d / "train.tsv", n_train, seed=0), write_sentiment(d / "dev.tsv", n_dev, seed=1)


def quiet(*_) -> None:
    """A log callback that prints nothing."""


def kill_cli_when(args: list, ready, repo: Path, timeout: float = 120.0) -> bool:
    """Start `python -m zoedge ARGS`, SIGKILL it as soon as ready() is true; True when it was still running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "zoedge", *map(str, args)], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.001)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def checkpoint_step(patch_dir: Path) -> int:
    """The step of the run's checkpoint in patch_dir (-1 while there is none)."""
    from zoedge.errors import ZoedgeError
    from zoedge.runtime.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(patch_dir)[2]["step"])
    except (ZoedgeError, OSError, KeyError):
        return -1
