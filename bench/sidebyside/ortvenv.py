"""The isolated virtual environment for the ONNX Runtime training baseline.

`onnxruntime-training-cpu` 1.19.2 (the last release; deprecated upstream) conflicts with the
`onnxruntime` wheel zoedge uses and needs numpy<2 and onnx<1.17, so it lives in its own venv.
`onnxruntime.training.api` imports torch: the CPU wheel is pinned, never a bare `torch`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Outside the repository tree (about 1.1 GB): the user's cache directory.
VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoedge" / "venv-ort-training"
PACKAGES = ["onnxruntime-training-cpu==1.19.2", "numpy<2", "onnx<1.17", "torch==2.13.0", "sympy", "packaging"]
STAMP = ".zoedge-bench-installed"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure(log=print) -> Path:
    """Create the venv once (Python 3.11: the last version 1.19.2 has wheels for) and return its python."""
    if (VENV / STAMP).is_file():
        return python()
    base = sys.executable if sys.version_info[:2] == (3, 11) else shutil.which("python3.11")
    if not base:
        raise RuntimeError("onnxruntime-training-cpu 1.19.2 needs Python 3.11 (no python3.11 found)")
    log(f"creating {VENV} (onnxruntime-training-cpu 1.19.2, numpy<2, onnx<1.17, torch 2.13.0 CPU) ...")
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    (VENV / STAMP).write_text(" ".join(PACKAGES) + "\n")
    return python()


if __name__ == "__main__":
    print(ensure())
