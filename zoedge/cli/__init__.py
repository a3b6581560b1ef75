"""The `zoedge` command line: typer apps joined into one. Heavy libraries are imported inside each command, so
the device commands never load torch and `zoedge --help` is instant.

    model.py   export, verify, inspect, train, eval (the bundle and its training)
    fleet.py   serve, device register, bundle publish / aggregate, push, pull, sync, patch replay
    bench.py   bench
    agent.py   agent (the long-running device loop)
    errors.py  one-line errors (exit 2)
"""

from __future__ import annotations

import typer

from zoedge.cli import agent, bench, fleet, model

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export a model to an ONNX bundle, fine-tune it on-device with forward passes only, sync patches.")
app.add_typer(model.app)
app.add_typer(fleet.app)
app.add_typer(bench.app)
app.add_typer(agent.app)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="zoedge")
