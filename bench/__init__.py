"""The benchmarks, run from the repository root of a checkout (not part of the installed package):

  python -m bench.sidebyside [--quick] ...      every contender side by side, each in its own process (`zoedge bench`)
  python -m bench.kshot run|assemble ...        the k-shot learning benchmark (docs/learning.md)
  python -m bench.kshot_explore probe|train ...  lever exploration on one k-shot split (docs/learning.md)
  python -m bench.quant_encoders ...            encoder int8 schemes against fp32 (docs/quantization.md)
  python -m bench.batch_dependence BUNDLE ...   how much a bundle's eval accuracy depends on the eval batch
  python -m bench.fleet_sim [report] ...        a simulated fleet: seed-pool ZO vs FedAvg vs one device (docs/fleet.md)

Every data, work and result path is an option; the defaults below are relative to this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SST2 = Path(os.environ.get("ZOEDGE_SST2", REPO.parent / "shared" / "data" / "sst2"))
RESULTS = REPO / "bench" / "results"
WORK = REPO / "out"  # git-ignored: bundles, scratch


def thread_env(threads: int) -> dict:
    """The environment for a benchmark subprocess: one thread count for every engine (onnxruntime through
    ZOEDGE_THREADS, torch / OpenMP / MKL, and tokenizers at 1 thread); 0 leaves each engine its default."""
    env = dict(os.environ)
    if threads:
        env.update(ZOEDGE_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if threads == 1:
            env["TOKENIZERS_PARALLELISM"] = "false"
    return env
