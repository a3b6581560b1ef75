"""Small measurements for scripts/arm64_check.sh, stdlib only (runs in the aarch64 rootfs and on x86).

  python arm64_measure.py size DIST [DIST ...]       installed MB of the dists and everything they require
  python arm64_measure.py import MODULE [MODULE ...] seconds to import them in a fresh interpreter (median of 3)
  python arm64_measure.py same-predictions A B       per-item agreement of two `zoedge predict` JSONL outputs
  python arm64_measure.py step-seconds LOG [FWD_S [EVAL_FWDS]]  seconds per ZO step from `zoedge train`'s step
                                                     lines (and per FWD_S, the seconds of one inference forward)
Each prints one JSON line. Without binfmt (qemu run directly) a fresh interpreter is started through $ARM64_QEMU.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def closure(names: list[str]) -> dict[str, metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement for another platform / Python
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            marker = req.split(";", 1)[1] if ";" in req else ""
            if marker and not _marker_true(marker):
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return seen


def _marker_true(marker: str) -> bool:
    try:
        from packaging.markers import Marker  # present in most venvs (pip vendors it, onnxruntime requires it)
    except ImportError:
        return True
    return Marker(marker).evaluate({"extra": ""})


def size(names: list[str]) -> dict:
    dists = closure(names)
    total = 0
    for dist in dists.values():
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
    return {"dists": sorted(dists), "mb": round(total / 1e6, 1)}


def import_time(modules: list[str]) -> dict:
    code = f"import time; t = time.perf_counter(); import {', '.join(modules)}; print(time.perf_counter() - t)"
    cmd = [c for c in (os.environ.get("ARM64_QEMU"), sys.executable, "-c", code) if c]
    subprocess.run(cmd, check=True, capture_output=True)  # compile .pyc first
    runs = [float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) for _ in range(3)]
    return {"modules": modules, "seconds": round(statistics.median(runs), 3), "runs": [round(r, 3) for r in runs]}


def same_predictions(a: str, b: str) -> dict:
    ra = [json.loads(line) for line in Path(a).read_text().splitlines() if line.startswith("{")]
    rb = [json.loads(line) for line in Path(b).read_text().splitlines() if line.startswith("{")]
    if len(ra) != len(rb) or not ra:
        return {"n": [len(ra), len(rb)], "same": False}
    diff = max(abs(pa - pb) for x, y in zip(ra, rb)
               for pa, pb in zip(x["probabilities"].values(), y["probabilities"].values()))
    agree = sum(x["label"] == y["label"] and x["text"] == y["text"] for x, y in zip(ra, rb))
    return {"n": len(ra), "agree": agree, "same": agree == len(ra), "max_prob_diff": diff}


def step_seconds(log: str, forward_s: str | None = None, eval_forwards: str = "0") -> dict:
    """Seconds per ZO step from `zoedge train`'s plain lines `step N/M: ..., Ts` (T = seconds since the start):
    (T at the last line - T at step 1) / the steps between, without start-up or head start. An eval's time lands
    in its step's line, so lines after an eval are not used, unless only the last one is left: then its eval,
    eval_forwards inference forwards of forward_s seconds, is taken off."""
    pts = [(int(m[1]), int(m[2]), "eval" in line) for line in Path(log).read_text().splitlines()
           for m in [re.match(r"step (\d+)/\d+: .*, (\d+)s$", line)] if m]
    plain = [p for p in pts if not p[2]]
    out: dict = {"points": [list(p) for p in pts], "s_per_step": None}
    if len(plain) >= 2:
        (n0, t0, _), (n1, t1, _) = plain[0], plain[-1]
        out["s_per_step"] = round((t1 - t0) / (n1 - n0), 2)
    elif plain and len(pts) >= 2 and forward_s is not None:
        (n0, t0, _), (n1, t1, _) = plain[0], pts[-1]
        out["s_per_step"] = round((t1 - t0 - int(eval_forwards) * float(forward_s)) / (n1 - n0), 2)
        out["eval_taken_off_s"] = round(int(eval_forwards) * float(forward_s), 2)
    if forward_s is not None:
        out["inference_forward_s"] = float(forward_s)
        out["step_over_forward"] = round(out["s_per_step"] / float(forward_s), 2) if out["s_per_step"] else None
    return out


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"size": size, "import": import_time, "step-seconds": lambda a: step_seconds(*a)}.get(cmd)
    print(json.dumps(fn(args) if fn else same_predictions(*args)))


if __name__ == "__main__":
    main()
