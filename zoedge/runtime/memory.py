"""Memory and step cost: parse budgets, read RSS, return free heap to the OS, plan a batch size that fits a memory
or a token budget."""

from __future__ import annotations

import ctypes
import os
import re
import resource
from functools import cache

from zoedge.errors import ZoedgeError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]?b?)\s*", text.lower())
    if not m:
        raise ZoedgeError(f"bad memory size {text!r} (use e.g. 300MB or 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def proc_status_mb(keys: tuple[str, ...] = ("VmHWM", "VmRSS", "RssAnon", "RssFile")) -> dict[str, float]:
    """These /proc/self/status memory lines of this process, in MB ({} where there is no /proc)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            return {ln.split(":")[0]: int(ln.split()[1]) / 1024.0 for ln in f if ln.split(":")[0] in keys}
    except OSError:
        return {}


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM from /proc (ru_maxrss carries a large parent's peak over fork+exec)."""
    peak = proc_status_mb(("VmHWM",)).get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's where the C library is glibc
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc malloc_trim(0)): memory freed between forwards that the
    allocator cannot reuse (fragmentation) otherwise stays in the RSS. False where there is no malloc_trim."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def plan_batch(budget_mb: float, fixed_mb: float, per_example_mb: float, requested: int) -> int:
    """Largest batch <= requested whose predicted peak fits the budget; refuse when even 1 does not."""
    per_example_mb = max(per_example_mb, 0.05)
    fits = int((budget_mb - fixed_mb) // per_example_mb)
    if fits < 1:
        need = fixed_mb + per_example_mb
        raise ZoedgeError(f"--max-memory {budget_mb:.0f}MB cannot fit this bundle: it needs about {need:.0f}MB "
                          f"for batch size 1 ({fixed_mb:.0f}MB model and runtime + {per_example_mb:.1f}MB per example)")
    return min(requested, fits)


def plan_training_batch(fwd, manifest, budget_mb: float, requested: int, moved_bytes: int, optimizer: str,
                        log) -> int:
    """Measure RSS growth of forwards at max length for batch 1 and 4, extrapolate, pick a batch that fits."""
    import numpy as np

    length = manifest.max_length
    ids = np.full((1, length), 100, dtype=np.int64)
    mask = np.ones((1, length), dtype=np.int64)
    from zoedge.manifest import OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS

    outs = (OUTPUT_LOGITS,) if manifest.task == "classify" else (OUTPUT_NLL, OUTPUT_TOKENS)
    fwd(ids, mask, outs)
    r1 = max(current_rss_mb(), peak_rss_mb())
    fwd(np.repeat(ids, 4, 0), np.repeat(mask, 4, 0), outs)
    r4 = max(current_rss_mb(), peak_rss_mb())
    per_example = max((r4 - r1) / 3.0, 0.05)
    buffers = {"zo-sgd": 0, "zo-momentum": 1, "zo-adam": 2}.get(optimizer, 2)
    state_mb = moved_bytes * (2 + buffers) / 2**20  # a snapshot and the best copy, plus the optimizer buffers
    fixed = r1 - per_example + state_mb
    batch = plan_batch(budget_mb, fixed, per_example, requested)
    if batch < requested:
        log(f"--max-memory {budget_mb:.0f}MB: batch size {requested} -> {batch} "
            f"(~{fixed:.0f}MB fixed + {per_example:.1f}MB per example)")
    return batch


def plan_token_batch(lengths: list[int], requested: int, budget: int, log) -> int:
    """Largest batch <= requested whose padded forward stays within `budget` tokens, taking a batch's width as
    the training rows' 90th-percentile token count (a batch is padded to its longest row): long documents take
    smaller batches, so a step costs about what it costs on short sentences (at least 1 example)."""
    import numpy as np

    width = max(1, int(np.percentile(lengths, 90)))
    batch = max(1, min(requested, budget // width))
    if batch < requested:
        log(f"--step-tokens {budget}: batch size {requested} -> {batch} (training rows: 90th percentile "
            f"{width} tokens)")
    return batch
