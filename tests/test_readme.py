"""The README's command synopsis is true to the CLI: every command and every option of it appears (issue 14)."""

from __future__ import annotations

import re

import typer

from conftest import REPO


def leaf_commands(group, prefix: str = "") -> dict:
    out = {}
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            out.update(leaf_commands(cmd, full + " "))
        else:
            out[full] = cmd
    return out


def synopsis() -> dict[str, str]:
    """README `## Commands` code block: command -> the text of its entry (up to the next `zoedge ` line)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"zoedge ((?:[a-z]+ ?)+?)(?= [A-Z\[]|$| --)", line.strip())
        if m:
            current = m.group(1).strip()
            entries[current] = ""
        if current:
            entries[current] += line + "\n"
    return entries


def test_readme_synopsis_lists_every_command_and_option():
    from zoedge.cli import app

    commands = leaf_commands(typer.main.get_command(app))
    entries = synopsis()
    missing = [c for c in commands if c not in entries]
    assert not missing, f"README synopsis lacks: {missing}"
    for name, cmd in commands.items():
        for p in cmd.params:
            for opt in p.opts:
                if opt.startswith("--") and opt != "--help":
                    assert opt in entries[name], f"README synopsis of `zoedge {name}` lacks {opt}"
