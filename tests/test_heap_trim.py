"""Free heap goes back to the OS between forwards (runtime/memory.py release_free_heap, constants.HEAP_TRIM_EVERY).

glibc keeps memory freed in the middle of its heap resident; the forwards' per-call allocations can fragment it
(which ones was not traced): an inference pass over 507 BBC texts after a training start grew SmolLM2's RSS by
3.4 MB a forward with the memory in use flat."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import zoedge.runtime.forward as forward
from zoedge.constants import HEAP_TRIM_EVERY
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.memory import current_rss_mb, release_free_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's; CI runs Linux")
def test_free_heap_in_the_middle_of_the_heap_leaves_the_rss():
    # 800 touched 96 KiB blocks (below glibc's 128 KiB mmap threshold, so on the heap); free every other one:
    # 37.5 MiB of free chunks between live ones, which only a trim can return (the heap's top stays in use)
    blocks = [b"x" * (96 << 10) for _ in range(800)]
    del blocks[::2]
    before = current_rss_mb()
    assert release_free_heap() is True  # CI and the devices run glibc Linux
    after = current_rss_mb()
    assert before - after > 20.0, (before, after)  # 37.5 MiB freed; half of it must leave the RSS at the least
    assert len(blocks) == 400  # uses the list after the measurement: its live half stays allocated until here


def test_the_forward_trims_the_heap_every_few_calls(tiny_bert_bundle, monkeypatch):
    calls = []
    monkeypatch.setattr(forward, "release_free_heap", lambda: calls.append(1) or True)
    bundle = Bundle.open(tiny_bert_bundle)
    fwd = forward.open_forward(bundle, bundle.initial_trainables())
    ids, mask = bundle.encoder.pad(bundle.encoder.token_ids(["a fine film", "a dull one"]))
    for _ in range(2 * HEAP_TRIM_EVERY + 1):
        (logits,) = fwd(ids, mask, ("logits",))
        assert np.isfinite(logits).all()
    assert len(calls) == 2
