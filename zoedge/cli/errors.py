"""How every zoedge command fails: one `zoedge: error: ...` line on stderr and exit 2 (130 when interrupted)."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer

from zoedge.errors import ZoedgeError


def fail(msg: str, code: int = 2) -> None:
    print(f"zoedge: error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZoedgeError as e:
            fail(str(e))
        except OSError as e:  # disk full, read-only or missing directory, permissions
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            fail("interrupted", 130)
    return wrapper


def csv_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
