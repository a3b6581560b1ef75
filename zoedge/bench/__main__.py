"""`python -m zoedge.bench bench ...`: the bench command without the main CLI (same options as `zoedge bench`)."""

import typer

from zoedge.bench.cli import register

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
register(app)


@app.callback()
def main() -> None:
    """zoedge benchmarks."""


app(prog_name="zoedge-bench")
