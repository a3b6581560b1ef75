"""`python -m zoedge.bench bench ...`: the bench command without the main CLI (same options as `zoedge bench`)."""

from zoedge.cli.bench import app

app(prog_name="zoedge-bench")
