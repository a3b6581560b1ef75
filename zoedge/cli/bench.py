"""`zoedge bench`: zoedge ZO against inference, PyTorch MeZO, PyTorch backprop and onnxruntime-training.

The benchmarks are the checkout's bench/ package (bench.sidebyside), not part of the installed zoedge: this
command runs them when `bench` is importable or zoedge is an editable install of a checkout (`make install`), and
says so in one line when it is neither (a wheel install: use `python -m bench.sidebyside` from a checkout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from zoedge.cli.errors import csv_list, fail, one_line_errors

app = typer.Typer()

NO_CHECKOUT = ("zoedge bench needs a source checkout: the benchmarks are its bench/ package, not installed and not "
               "importable here (the `zoedge` script never sees it); run `python -m bench.sidebyside ...` or "
               "`python -m zoedge bench ...` from the repository root")


def _checkout_bench():
    """An editable install (`pip install -e .`, what `make install` does) runs from its checkout: the bench package
    beside the zoedge package is that checkout's. None when zoedge is installed from a wheel."""
    import importlib
    import sys

    import zoedge

    root = Path(zoedge.__file__).resolve().parent.parent
    if not (root / "bench" / "sidebyside" / "__init__.py").is_file():
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("bench.sidebyside.run")


@app.command()
@one_line_errors
def bench(
    quick: bool = typer.Option(False, "--quick", help="Smoke test: tiny-bert, a few steps (< 3 minutes)"),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (default: minilm,smollm2-135m; "
                                                    "--quick: tiny-bert)"),
    only: Optional[str] = typer.Option(None, help="Comma-separated contenders to run (default: all)"),
    data: Optional[Path] = typer.Option(None, help="SST-2 directory with train.tsv, test.tsv (default: "
                                                   "../shared/data/sst2 beside the checkout, or $ZOEDGE_SST2)"),
    work: Optional[Path] = typer.Option(None, help="Bundles and scratch, cached between runs (default: out/bench)"),
    results: Optional[Path] = typer.Option(None, help="Result JSON directory (default: bench/results in the "
                                                      "checkout; --quick: WORK/quick-results)"),
    threads: int = typer.Option(1, help="Threads for every engine (onnxruntime, torch, tokenizers); 0 = each "
                                       "engine's default. 1 keeps a shared machine's load from distorting"),
    docs: Optional[Path] = typer.Option(None, help="Where benchmarks.md and the PNGs go (default: docs in the "
                                                   "checkout; --quick: the results directory)"),
    speed: bool = typer.Option(False, "--speed", help="Forward speed instead (bench.speed): every quantization "
                                                      "scheme against fp32, agreement, and GEMM rate against the "
                                                      "same-precision peak; --models, --data, --threads apply"),
) -> None:
    """Benchmark peak memory, step time and learning curves of every contender, each in its own process."""
    try:
        from bench.sidebyside import run
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.sidebyside"):
            raise
        run = _checkout_bench() or fail(NO_CHECKOUT)
    if speed:
        import importlib

        args = ["--models", ",".join(csv_list(models) or ["minilm", "smollm2-135m", "gemma3-270m"]),
                "--threads", str(threads)]
        args += ["--data", str(data)] if data else []
        args += ["--out", str(results / "speed.json")] if results else []
        importlib.import_module("bench.speed").main(args)
        return
    run.main(quick, csv_list(models), csv_list(only), data, work, results, threads, docs, log=typer.echo)
