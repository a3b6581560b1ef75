"""The head start: before any ZO step, fit the head in closed form (a linear probe on the frozen features the
graph returns, numpy only); decoders first pick their prompt among the bundle's candidates. A decoder's exported
head is the prompt's zero-shot classifier (the label words' LM rows): a head start is kept only when it beats that
head on the eval data by more than HEAD_START_MIN_GAIN_SE paired standard errors, so training never starts below the
bundle on the strength of a few lucky eval examples (SmolLM2, SST-2 k = 16, seed 42: the centred probe lowered the
CE on 32 validation sentences and cost 4.2 points on the 872 test sentences). An encoder's exported head is random, no
baseline to keep (on a k = 16 Drugs.com split it scored 41.7% on the 48 validation reviews by chance, the probe
below it, and the dropped probe cost 8.7 test points)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from zoedge.constants import (HEAD_START_MIN_GAIN_SE, PROBE_WARM_START_STRENGTH, PROMPT_SEARCH_EXAMPLES,
                              PROMPT_SEARCH_MIN_EXAMPLES)
from zoedge.manifest import OUTPUT_FEATURES, Manifest
from zoedge.runtime.evaluator import Dataset, Evaluator, fmt, paired_gain
from zoedge.runtime.head_grad import head_names
from zoedge.runtime.probe import choose_l2, fit_linear_probe


@dataclass
class HeadStart:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # the fitted head (empty: the exported head)
    prompt_search: list[dict] = field(default_factory=list)
    metrics: dict[str, float] | None = None  # on the eval data, when there is some


def head_start(m: Manifest, bundle, evaluator: Evaluator, data: Dataset, tensors: dict[str, np.ndarray],
               limit: int, seed: int, search: bool, eval_set: Dataset | None, start_logits: np.ndarray | None,
               log: Callable[[str], None], select: str = "loss") -> HeadStart:
    """Fit the head into `tensors` (in place); on a decoder, undo it unless the eval data shows it better than the
    exported head beyond noise (start_logits: the exported head's logits on eval_set)."""
    exported = {t.name: tensors[t.name].copy() for t in m.trainables if t.role == "head"}
    given_template = bundle.encoder.template
    candidates = m.prompt_candidates if search and len(m.prompt_candidates) > 1 else []
    fitted, searched = fit_probe_head(m, bundle, evaluator, data, tensors, limit, seed, candidates, log, eval_set,
                                      warm_start=True)
    hs = HeadStart(fitted, searched)
    if eval_set is None:
        return hs
    hs.metrics, logits = evaluator.measure(eval_set)
    log(f"linear-probe head: eval {fmt(hs.metrics)}")
    if m.kind == "decoder" and start_logits is not None:
        gain, se = paired_gain(start_logits, logits, eval_set.labels, select)
        z = gain / se if se else (float("inf") if gain > 0 else 0.0)
        log(f"linear-probe head against the exported head on the eval data: {gain:+.4f} per example "
            f"({z:+.1f} paired SE)")
        if not gain > HEAD_START_MIN_GAIN_SE * se:
            for k, v in exported.items():
                np.copyto(tensors[k], v)
            bundle.encoder.template = given_template
            log(f"the gain is not above {HEAD_START_MIN_GAIN_SE:g} paired SE: keeping the exported head")
            return HeadStart(prompt_search=searched)
    return hs


def fit_probe_head(m: Manifest, bundle, evaluator: Evaluator, data: Dataset, tensors: dict[str, np.ndarray],
                   limit: int, seed: int, candidates: list[str], log: Callable[[str], None],
                   eval_set: Dataset | None = None, centred: bool | None = None,
                   warm_start: bool = False) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Fit the head on the frozen features of up to `limit` training examples; returns the new head tensors.

    With prompt candidates (decoders), first pick the template whose features give the best held-out probe
    accuracy on the first PROMPT_SEARCH_EXAMPLES of those examples, and leave it set on `bundle.encoder`.
    The L2 is chosen by cross-entropy on `eval_set` when given (else on a held-out fifth, see choose_l2).
    centred (default: decoders): shrink towards the exported head (the prompt's zero-shot label-word rows) rather
    than towards zero, so that a probe on 32 examples refines the zero-shot classifier instead of replacing it
    (SmolLM2, SST-2 k = 16, seed 13: test 79.0% zero-shot, 73.1% plain probe, 80.0% centred at L2 10).
    warm_start (the trainer's head start; not the LP baseline): a plain probe's L2 is at least
    PROBE_WARM_START_STRENGTH / examples, so that a probe on a few examples does not fit them perfectly and leave
    the ZO steps no training loss to descend (MiniLM, SST-2 k = 16, seed 13: the CE-chosen L2 1 leaves training
    CE 0.10 and 2,000 ZO steps move test 65.1 -> 65.5%; L2 30 leaves 0.53 and they move it 66.7 -> 68.7%)."""
    n = len(data.texts)
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(n)[:limit] if n > limit else np.arange(n)
    labels = data.labels[idx]
    k = min(PROMPT_SEARCH_EXAMPLES, len(idx))
    searched: list[dict] = []
    cached: dict[str, np.ndarray] = {}
    if candidates and k >= PROMPT_SEARCH_MIN_EXAMPLES:
        for template in candidates:
            bundle.encoder.template = template
            (cached[template],) = evaluator.outputs(data, (OUTPUT_FEATURES,), idx[:k])
            _, scores = choose_l2(cached[template], labels[:k], len(m.labels), seed)
            searched.append({"prompt_template": template,
                             "held_out_accuracy": max(v["accuracy"] for v in scores.values())})
        chosen = max(searched, key=lambda r: r["held_out_accuracy"])  # ties: the earlier candidate
        bundle.encoder.template = chosen["prompt_template"]
        log(f"prompt: {chosen['prompt_template']!r} (held-out probe accuracy {chosen['held_out_accuracy']:.3f} on {k} "
            f"examples; {len(candidates)} candidates)")
    head_part = cached.get(bundle.encoder.template)
    done = 0 if head_part is None else len(head_part)
    parts = [] if head_part is None else [head_part]
    if done < len(idx):
        parts += evaluator.outputs(data, (OUTPUT_FEATURES,), idx[done:])
    features = np.concatenate(parts)
    prior = None
    if m.kind == "decoder" if centred is None else centred:
        weight, bias = head_names(m)
        prior = (tensors[weight].copy(), tensors[bias].copy() if bias else np.zeros(len(m.labels), np.float32))
    held = None
    if eval_set is not None and eval_set.labels is not None:
        (eval_features,) = evaluator.outputs(eval_set, (OUTPUT_FEATURES,))
        held = (eval_features, eval_set.labels)
    l2, scores = choose_l2(features, labels, len(m.labels), seed, prior, held)
    if warm_start and prior is None:
        l2 = max(l2, PROBE_WARM_START_STRENGTH / len(labels))
    w, b = fit_linear_probe(features, labels, len(m.labels), l2=l2, prior=prior)
    grid = ", ".join(f"{k:g}: {v['loss']:.3f}" for k, v in scores.items()) or "nothing held out: the default"
    log(f"linear-probe head: L2 {l2:.3g}, {'centred on the exported head' if prior else 'plain'} (cross-entropy on "
        f"{'the eval data' if held else 'a held-out fifth'}: {grid})")
    start = {}
    for t in m.trainables:
        if t.role == "head":
            np.copyto(tensors[t.name], (w if len(t.shape) == 2 else b).astype(np.float32))
            start[t.name] = tensors[t.name].copy()
    return start, searched
