"""One contender in one process, so its peak RSS (getrusage ru_maxrss) is its own.

  python -m bench.sidebyside.worker CONTENDER --settings SETTINGS.json --json OUT.json

Writes {contender, ok, reason, peak_rss_mb, torch_imported, loadavg_start/end, seconds, ...results}.
Imports nothing heavy itself; the zoedge contenders import no torch (recorded as torch_imported).

Peak RSS is VmHWM from /proc/self/status: the high-water mark of this process image alone. getrusage's
ru_maxrss is recorded too, but Linux carries the parent's RSS at fork over an exec into it, so a worker
started by a large process would report the parent's size (a 400 MB parent -> ru_maxrss 409 MB for a
13 MB child, measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path


def status_mb() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssAnon, RssFile of this process, in MB."""
    from zoedge.runtime.memory import proc_status_mb

    return {k: round(v, 1) for k, v in proc_status_mb().items()}


def vm_hwm_mb() -> float:
    from zoedge.runtime.memory import peak_rss_mb

    return peak_rss_mb()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("contender")
    ap.add_argument("--settings", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    s = json.loads(a.settings.read_text())
    row = {"contender": a.contender, "model": s["model"], "loadavg_start": list(os.getloadavg())}
    t = time.perf_counter()
    try:
        from bench.sidebyside.contenders import CONTENDERS

        row.update(CONTENDERS[a.contender](s))
        row["ok"] = True
    except Exception as e:  # the row says why; no numbers are made up
        row.update(ok=False, reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}")
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t, 2)
    row["loadavg_end"] = list(os.getloadavg())
    row.setdefault("peak_rss_mb", round(vm_hwm_mb(), 1))
    row.setdefault("ru_maxrss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1))
    row.setdefault("torch_imported", "torch" in sys.modules)
    row["python"] = platform.python_version()
    row.setdefault("status_end_mb", status_mb())
    a.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
