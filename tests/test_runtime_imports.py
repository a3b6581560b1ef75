"""The device runtime must import without torch, transformers, peft or optimum."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "optimum", "onnx", "fastapi", "sqlalchemy")


def test_runtime_imports_no_heavy_libraries():
    code = (
        "import sys, zoedge.runtime, zoedge.runtime.engine, zoedge.runtime.data, zoedge.runtime.trainer, zoedge.runtime.evaluate, zoedge.runtime.patch, zoedge.runtime.forward, zoedge.manifest, zoedge.cli, zoedge.device.client, zoedge.device.outbox\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the runtime loaded: {out}"
