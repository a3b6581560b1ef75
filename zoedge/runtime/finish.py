"""The end of a training run: the patch (the best or the last tensors, the trajectory that rebuilds them, the head
start and the run's metadata) and the summary `train` returns; or, on --resume of a run whose patch is already
written, that summary read back from the patch."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.config import TrainConfig, trajectory_key
from zoedge.runtime.evaluator import paired_gain_of
from zoedge.runtime.head_grad import head_names
from zoedge.runtime.memory import peak_rss_mb
from zoedge.runtime import seedpool
from zoedge.runtime.patch import read_patch, write_patch
from zoedge.runtime.prior import adapt_prior
from zoedge.runtime.setup import Run


def gate_kept_step(run: Run, log: Callable[[str], None]) -> None:
    """A decoder's best step against step 0 (the exported head, or a probe head start that passed its own gate) on
    the eval data: the per-example gain and its paired standard error, recorded in the patch; under
    --min-gain-se N the patch falls back to step 0 unless the gain is above N SE. Keep-best picks the best of many
    evaluations of a few noisy sentences; this says whether its winner beats its start beyond that noise. Both tensor
    sets are evaluated here, so a resumed run decides the same way."""
    m, cfg, state, eval_set = run.m, run.cfg, run.state, run.eval_set
    if not (m.kind == "decoder" and m.task == "classify" and cfg.keep == "best" and eval_set is not None
            and state.best_step > 0):
        return
    origin = {**run.bundle.initial_trainables(), **state.start}
    gain, se = paired_gain_of(run.evaluator, run.tensors, origin, state.best, eval_set, cfg.select)
    kept = bool(gain > cfg.min_gain_se * se)
    state.kept_gain = {"step": state.best_step, "gain": gain, "se": se, "kept": kept}
    log(f"step {state.best_step} against step 0 on the eval data: {gain:+.4f} per example "
        f"({gain / se if se else 0.0:+.1f} paired SE)")
    if not kept:
        log(f"the gain is not above --min-gain-se {cfg.min_gain_se:g} paired SE: the patch keeps step 0")
        state.best, state.best_step = origin, 0


def write_result(run: Run, t0: float, unlabelled: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write the patch of the finished run to run.out; returns the summary (t0: when train started). With
    `unlabelled` texts, the head's bias first moves to their estimated label prior (runtime/prior.py), on copies:
    the checkpoint keeps the tensors as trained, so a resume redoes the same shift once."""
    m, cfg, state, eval_set = run.m, run.cfg, run.state, run.eval_set
    use_best = cfg.keep == "best" and eval_set is not None
    final_step = state.best_step if use_best else state.step
    final = state.best if use_best else state.tensors
    final_metrics = next((h for h in state.history if h["step"] == final_step), None) if use_best else None
    if eval_set is not None and final_metrics is None:
        final_metrics = {f"eval_{k}": v for k, v in run.evaluator(eval_set).items()}
    label_prior = None
    if unlabelled is not None:
        final = {k: v.copy() for k, v in final.items()}
        label_prior = _adapt_prior(run, final, unlabelled, log, (final_metrics or {}).get("eval_accuracy"))
    seconds = time.perf_counter() - t0
    metrics = {
        "eval_accuracy_start": (state.start_metrics or {}).get("accuracy"),
        "eval_accuracy_head_start": (state.lp_metrics or {}).get("accuracy"),
        "eval_accuracy": (final_metrics or {}).get("eval_accuracy"),
        "eval_loss": (final_metrics or {}).get("eval_loss"),
        "kept_gain": state.kept_gain,
        "history": state.history,
    }
    meta = {
        "steps": int(final_step), "steps_run": int(state.step), "run_seed": cfg.seed, "zo": run.zo_cfg.to_dict(),
        "examples": len(run.train_set.texts), "metrics": metrics, "seconds": seconds,
        "hyperparameters": {**asdict(cfg), "batch_size": state.batch}, "rollbacks": state.rollbacks,
        "forward_passes": run.fwd.calls, "optimizer_state_bytes": run.opt.nbytes(), "label_prior": label_prior,
    }
    if m.kind == "decoder" and m.task == "classify":
        meta["prompt_template"] = run.bundle.encoder.template  # the patch is read through this prompt
        if state.prompt_search:
            meta["prompt_search"] = state.prompt_search
    start = state.start
    if cfg.head_lr:  # replay rebuilds only what ZO moved: the head travels as it ended, beside the head start
        start = {**start, **{t.name: final[t.name] for t in m.trainables if t.role == "head"}}
    coefficients = None
    if cfg.seed_pool:  # the patch is θ0 − Σ c_j z_j, rebuilt as every other copy of it is (runtime/seedpool.py)
        pool = run.dirs.pool
        base = seedpool.load_coefficients(cfg.seed_pool_from, pool.k) if cfg.seed_pool_from else None
        coefficients = seedpool.coefficients(state.trajectory[:final_step], cfg.seed, pool.k, cfg.perturbations,
                                             base=base)
        final = {**run.bundle.initial_trainables(), **{k: v.copy() for k, v in start.items()}}
        seedpool.rebuild(run.zo_cfg.select(final, run.roles), pool.id, coefficients)
        meta.update(seed_pool_id=pool.id, seed_pool_k=pool.k)
    write_patch(run.out, m, final, state.trajectory[:final_step], start, meta, coefficients)
    return _summary(run.out, meta, metrics, seconds, run.fwd.calls)


def _adapt_prior(run: Run, final: dict, unlabelled: str | Path, log: Callable[[str], None],
                 eval_accuracy: float | None) -> dict | None:
    weight, bias = head_names(run.m)
    if np.array_equal(final[weight], run.bundle.initial_trainables()[weight]):
        log("--unlabelled: the patch keeps the exported head, which no training set's prior shaped: no shift")
        return None
    return adapt_prior(run.evaluator, run.tensors, final, bias, run.train_set.labels, unlabelled, run.eval_set, log,
                       eval_accuracy)


def finished(out: Path, m: Manifest, cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """--resume on a directory whose patch is already written: the same run is done, say so and return it."""
    doc = read_patch(out)
    hp = doc.get("hyperparameters") if isinstance(doc.get("hyperparameters"), dict) else {}
    key = {k: v for k, v in trajectory_key(cfg).items() if k != "batch_size"}
    same = all(k in hp and hp[k] == v for k, v in key.items())
    if doc.get("bundle_id") != m.bundle_id or not same:
        raise ZoedgeError(f"--resume: {out} holds a finished patch of another bundle or with other settings")
    log(f"--resume: {out} already holds the finished patch of this run")
    return _summary(out, doc, doc.get("metrics") or {}, float(doc.get("seconds") or 0.0),
                    int(doc.get("forward_passes", 0)))


def _summary(out: Path, meta: dict, metrics: dict, seconds: float, forward_passes: int) -> dict:
    result = {
        "steps": meta["steps"], "steps_run": meta["steps_run"], "seconds": round(seconds, 2),
        "eval_accuracy_start": metrics.get("eval_accuracy_start"),
        "eval_accuracy_head_start": metrics.get("eval_accuracy_head_start"),
        "eval_accuracy": metrics.get("eval_accuracy"), "peak_rss_mb": round(peak_rss_mb(), 1),
        "forward_passes": forward_passes, "batch_size": meta["hyperparameters"]["batch_size"],
        "rollbacks": meta["rollbacks"], "optimizer_state_bytes": meta["optimizer_state_bytes"], "patch": str(out),
        "kept_gain": metrics.get("kept_gain"), "history": metrics.get("history", []),
    }
    if "prompt_template" in meta:
        result["prompt_template"] = meta["prompt_template"]
    if meta.get("label_prior") is not None:
        result["label_prior"] = meta["label_prior"]
    return result
