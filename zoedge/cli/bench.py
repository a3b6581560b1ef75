"""`zoedge bench`: zoedge ZO against inference, PyTorch MeZO, PyTorch backprop and onnxruntime-training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


app = typer.Typer()


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="Smoke test: tiny-bert, a few steps (< 3 minutes)"),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (default: minilm,smollm2-135m; "
                                                    "--quick: tiny-bert)"),
    only: Optional[str] = typer.Option(None, help="Comma-separated contenders to run (default: all)"),
    data: Path = typer.Option(Path("../shared/data/sst2"), help="SST-2 directory (train.tsv, test.tsv)"),
    work: Path = typer.Option(Path("out/bench"), help="Bundles and scratch (cached between runs)"),
    results: Optional[Path] = typer.Option(None, help="Result JSON directory (default: bench/results; "
                                                      "--quick: WORK/quick-results)"),
    threads: int = typer.Option(1, help="Threads for every engine (onnxruntime, torch, tokenizers); 0 = each "
                                       "engine's default. 1 keeps a shared machine's load from distorting"),
    docs: Optional[Path] = typer.Option(None, help="Where benchmarks.md and the PNGs go (default: docs; "
                                                   "--quick: the results directory)"),
) -> None:
    """Benchmark peak memory, step time and learning curves of every contender, each in its own process."""
    from zoedge.bench.report import markdown, plots, write_json
    from zoedge.bench.run import ORDER, run_model
    from zoedge.cli.errors import fail

    for f in ("train.tsv", "test.tsv"):
        if not (data / f).is_file():
            fail(f"--data {data}: no {f}")
    names = [m.strip() for m in (models or ("tiny-bert" if quick else "minilm,smollm2-135m")).split(",") if m.strip()]
    chosen = [c.strip() for c in only.split(",")] if only else None
    if chosen and set(chosen) - set(ORDER):
        fail(f"bad --only: choose from {', '.join(ORDER)}")
    results = results or (work / "quick-results" if quick else Path("bench/results"))
    docs = docs or (results if quick else Path("docs"))
    prefix = "quick-" if quick else ""
    for model in names:
        res = run_model(model, quick, work / (f"quick-{model}" if quick else model), data, chosen, threads)
        res["plots"] = plots(res, docs)
        write_json(res, results / f"{prefix}{model}.json")
        typer.echo(f"bench: wrote {results / f'{prefix}{model}.json'}")
    # The table covers every model's latest results in the directory, not only this run's.
    found = sorted(p for p in results.glob(f"{prefix}*.json") if quick or not p.name.startswith("quick-"))
    docs_list = [d for d in (json.loads(p.read_text()) for p in found) if "rows" in d and "settings" in d]
    docs_list.sort(key=lambda d: (d["settings"]["model"] != "minilm", d["settings"]["model"]))
    md = docs / ("benchmarks-quick.md" if quick else "benchmarks.md")
    md.write_text(markdown(docs_list))
    typer.echo(f"bench: wrote {md}")
