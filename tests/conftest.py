"""Shared fixtures: tiny bundles exported once per session, SST-2 paths, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("ZOEDGE_SST2", REPO.parent / "shared" / "data" / "sst2"))


def run_cli(*args: str, check: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m zoedge ARGS` in a subprocess, as a user would."""
    p = subprocess.run([sys.executable, "-m", "zoedge", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"zoedge {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def tsv_head(src: Path, dest: Path, n: int) -> Path:
    """dest holds src's header and its first n rows (a smaller sample of a real TSV)."""
    dest.write_text("".join(Path(src).read_text().splitlines(keepends=True)[: n + 1]))
    return dest


def export_tiny(out: Path, model: str, *extra: str) -> Path:
    from zoedge.export.bundle import ExportOptions, export_bundle

    opts = ExportOptions(model=model, out=out)
    it = iter(extra)
    for flag in it:
        value = next(it)
        if flag == "--lora-targets":
            value = value.split(",")
        setattr(opts, flag.lstrip("-").replace("-", "_"), value)
    export_bundle(opts, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_bert_bundle(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("b") / "tiny-bert", "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("b") / "tiny-llama", "tiny-llama")


@pytest.fixture(scope="session")
def sst2() -> Path:
    if not (SST2 / "test.tsv").is_file():
        pytest.fail(f"SST-2 not found at {SST2} (set ZOEDGE_SST2)")
    return SST2
