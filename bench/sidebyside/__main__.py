"""`python -m bench.sidebyside ...`: `zoedge bench` by its module name (the same options: zoedge/cli/bench.py)."""

from zoedge.cli.bench import app

app(prog_name="python -m bench.sidebyside")
