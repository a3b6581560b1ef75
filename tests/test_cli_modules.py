"""The CLI is a package of typer apps without import cycles: every module imports on its own, and the joined app
has every command (issue 14)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

MODULES = ["zoedge.cli", "zoedge.cli.errors", "zoedge.cli.model", "zoedge.cli.fleet", "zoedge.cli.bench",
           "zoedge.cli.agent"]


@pytest.mark.parametrize("module", MODULES)
def test_every_cli_module_imports_alone(module):
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_joined_app_has_every_command():
    p = subprocess.run([sys.executable, "-m", "zoedge", "--help"], capture_output=True, text=True, cwd=REPO)
    for command in ("export", "verify", "inspect", "train", "eval", "serve", "push", "pull", "sync", "device",
                    "bundle", "patch", "bench", "predict", "patches", "agent"):
        assert f" {command} " in p.stdout, (command, p.stdout)


def test_train_help_comes_from_the_config_fields():
    from zoedge.runtime.config import TrainConfig

    p = subprocess.run([sys.executable, "-m", "zoedge", "train", "--help"], capture_output=True, text=True, cwd=REPO,
                       env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
    text = " ".join(p.stdout.split())
    for name in ("head_lr", "lp_examples", "checkpoint_every"):
        words = " ".join(TrainConfig.__dataclass_fields__[name].metadata["help"].split())
        assert words[:40] in text, (name, words)
