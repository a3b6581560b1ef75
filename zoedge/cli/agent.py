"""`zoedge agent --config agent.toml`: the long-running device agent (zoedge.device.agent)."""

from __future__ import annotations

from pathlib import Path

import typer

from zoedge.cli.errors import one_line_errors

app = typer.Typer()


@app.command()
@one_line_errors
def agent(
    config: Path = typer.Option(..., "--config", help="agent.toml: server, token, bundle, data folder, state_dir, "
                                                      "interval, train budget (docs/device.md)"),
    cycles: int = typer.Option(0, help="Stop after this many cycles (0: run until SIGTERM / SIGINT)"),
) -> None:
    """Run the device agent: each cycle pull the newest global patch, train on new labelled local data within the
    time and memory budget starting from it, push the result, sleep. One JSON line per event on stdout; state in
    STATE_DIR/status.json. Safe to SIGKILL at any moment (the next start resumes)."""
    from zoedge.device.agent import Agent
    from zoedge.device.agent_config import load_config

    Agent(load_config(config)).run(cycles=cycles)
