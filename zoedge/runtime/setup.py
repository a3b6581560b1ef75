"""Opening a training run: the bundle and --out (`open_out`), then the data, the forward engine, the run state
(fresh with its head start, or resumed from the checkpoint) and the objects the loop calls (`open_run`), gathered
in one `Run`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zoedge.constants import KEEP_Z_BYTES
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.checkpoint import CHECKPOINT_FILE
from zoedge.runtime.config import TrainConfig, resolve, trajectory_key
from zoedge.runtime.estimate import Estimator
from zoedge.runtime.evaluator import Dataset, Evaluator, fmt, load_dataset, score
from zoedge.runtime.forward import open_forward
from zoedge.runtime.guard import tensor_limits, tensor_problem
from zoedge.runtime.head_grad import head_names
from zoedge.runtime.head_start import head_start
from zoedge.runtime.memory import parse_size, plan_token_batch, plan_training_batch
from zoedge.runtime.patch import PATCH_FILE, PATCH_FILES
from zoedge.runtime.seedpool import SeedPool, continue_from, pool_id
from zoedge.runtime.state import RunState
from zoedge.runtime.zo import DirectionCache, OptimizerState, ZOConfig


@dataclass
class Run:
    """What the loop reads and moves. `tensors` are the live trainables (bound zero-copy to `fwd`, held by
    `state`); `moving` the ones ZO perturbs and updates, `checked` the ones an update can change."""

    bundle: Bundle
    cfg: TrainConfig  # resolved against the manifest
    out: Path
    train_set: Dataset
    eval_set: Dataset | None
    tensors: dict[str, np.ndarray]
    roles: dict[str, str]
    fwd: object
    evaluator: Evaluator
    zo_cfg: ZOConfig
    moving: dict[str, np.ndarray]
    checked: dict[str, np.ndarray]
    dirs: DirectionCache
    head: tuple[str, str | None] | None  # (weight, bias) trained by its exact gradient under --head-lr
    estimate: Estimator
    state: RunState
    limits: dict[str, float]
    opt: OptimizerState

    @property
    def m(self) -> Manifest:
        return self.bundle.manifest


def open_out(bundle_dir: str | Path, out: str | Path, cfg: TrainConfig, resume: bool,
             log: Callable[[str], None]) -> tuple[Bundle, TrainConfig, Path, str]:
    """The bundle, the resolved settings, --out and what it holds: 'resume', 'finished' or 'fresh'."""
    bundle = Bundle.open(bundle_dir)
    cfg = resolve(cfg, bundle.manifest)
    out = Path(out)
    return bundle, cfg, out, _prepare_out(out, resume, log)


def open_run(bundle: Bundle, cfg: TrainConfig, out: Path, mode: str, data: str | Path,
             eval_path: str | Path | None, log: Callable[[str], None]) -> Run:
    """Everything the loop needs, at step 0 of a fresh run (head start done, first checkpoint saved) or at the
    checkpoint's step of a resumed one (checked like a bundle's initial values)."""
    m = bundle.manifest
    train_set = load_dataset(data, m)
    eval_set = load_dataset(eval_path, m, cfg.eval_limit) if eval_path else None

    tensors = bundle.initial_trainables()
    roles = {t.name: t.role for t in m.trainables}
    fwd = open_forward(bundle, tensors)
    evaluator = Evaluator(bundle, fwd, batch=cfg.batch_size)  # at the training batch: the arena keeps the largest
    zo_roles = cfg.roles
    head = head_names(m) if cfg.head_lr else None  # trained by its exact gradient: ZO leaves it alone
    if head:
        zo_roles = sorted({r for r in (cfg.roles or roles.values()) if r != "head"})
    zo_cfg = ZOConfig(optimizer=cfg.optimizer, eps=cfg.eps, perturbations=cfg.perturbations,
                      weight_decay=cfg.weight_decay, clip=cfg.clip, inplace=not cfg.batched, roles=zo_roles)
    moving = zo_cfg.select(tensors, roles)  # the arrays ZO perturbs and updates (shared with `tensors`)
    checked = {**moving, **({n: tensors[n] for n in head if n} if head else {})}  # what an update can change
    moved_bytes = sum(t.nbytes for t in moving.values())
    pool = SeedPool(pool_id(m), cfg.seed_pool) if cfg.seed_pool else None  # every z from the bundle's seed pool
    dirs = DirectionCache([(n, tuple(t.shape)) for n, t in moving.items()], keep=moved_bytes <= KEEP_Z_BYTES,
                          pool=pool)
    estimate = Estimator(fwd, m, cfg, moving, dirs, head=bool(head))
    width = cfg.perturbations + 1

    if mode == "resume":
        state = RunState.load(out, tensors, cfg.steps, width, m.bundle_id, trajectory_key(cfg))
        bundle.encoder.template = state.prompt_template or bundle.encoder.template
        log(f"resuming at step {state.step} of {cfg.steps}")
    else:
        state = RunState(bundle_id=m.bundle_id, config=trajectory_key(cfg), tensors=tensors,
                         trajectory=np.zeros((cfg.steps, width), np.float32))
        state.batch = cfg.batch_size
        if cfg.step_tokens:  # planned once from the training rows, like the memory plan below
            state.batch = plan_token_batch([len(r) for r in train_set.rows(bundle.encoder)], state.batch,
                                           cfg.step_tokens, log)
            if state.batch < cfg.batch_size:  # the lr with it (linear scaling); kept by checkpoints and resume
                state.lr_scale = state.batch / cfg.batch_size
                log(f"--step-tokens {cfg.step_tokens}: the lr scales with the batch: x{state.lr_scale:.3g} "
                    f"({cfg.lr:g} -> {cfg.lr * state.lr_scale:.3g})")
        if cfg.max_memory:  # planned once; a resumed run keeps the batch (it is part of the trajectory)
            state.batch = plan_training_batch(fwd, m, parse_size(cfg.max_memory) / 2**20, state.batch,
                                              moved_bytes, cfg.optimizer, log)
        if cfg.seed_pool_from:  # the next round: start at the global's tensors; its head start stays the start
            state.start = continue_from(cfg.seed_pool_from, m, tensors, pool, zo_cfg)[0]
        _start(state, m, bundle, evaluator, train_set, eval_set, cfg, log)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.checkpoint_every:
            state.save(out)  # the head start is not lost to a kill before the first step's checkpoint
    evaluator.batch = state.batch
    origin = {**bundle.initial_trainables(), **state.start}
    limits = tensor_limits(origin)
    if mode == "resume":  # a checkpoint is checked like a bundle's initial values
        problem = tensor_problem(tensors, limits) or tensor_problem(state.best, limits)
        if problem:
            raise ZoedgeError(f"--resume: {out / CHECKPOINT_FILE}: {problem}: the saved run state is corrupt; "
                              "move it away to start fresh")
    opt = OptimizerState(step=state.step, buffers=state.optimizer)
    return Run(bundle=bundle, cfg=cfg, out=out, train_set=train_set, eval_set=eval_set, tensors=tensors, roles=roles,
               fwd=fwd, evaluator=evaluator, zo_cfg=zo_cfg, moving=moving, checked=checked, dirs=dirs, head=head,
               estimate=estimate, state=state, limits=limits, opt=opt)


# ---- helpers (called above, top to bottom) ----------------------------------------------------------------------


def _prepare_out(out: Path, resume: bool, log: Callable[[str], None]) -> str:
    """'resume' (a checkpoint is there), 'finished' (--resume after the patch was written) or 'fresh'."""
    if out.exists() and not out.is_dir():
        raise ZoedgeError(f"--out {out}: exists and is not a directory")
    _remove_stale_temporaries(out)  # left by a kill during an atomic write; never a complete file
    if resume and (out / CHECKPOINT_FILE).is_file():
        return "resume"
    if resume and (out / PATCH_FILE).is_file():
        return "finished"
    if out.is_dir() and any(out.iterdir()):
        hint = "and holds no checkpoint to resume" if resume else "(use --resume to continue a run, or another --out)"
        raise ZoedgeError(f"--out {out}: directory is not empty {hint}")
    if resume:
        log(f"--resume: no checkpoint in {out} yet: starting fresh")
    return "fresh"


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.NAME.xxxx` temporaries of our own atomic writes (a SIGKILL mid-write leaves them behind)."""
    if not out.is_dir():
        return
    ours = (CHECKPOINT_FILE, *PATCH_FILES)
    for p in out.iterdir():
        if p.is_file() and any(p.name.startswith(f".{name}.") for name in ours):
            p.unlink(missing_ok=True)


def _start(state: RunState, m: Manifest, bundle: Bundle, evaluator: Evaluator, train_set: Dataset,
           eval_set: Dataset | None, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """Step 0: eval of the exported tensors, the head start, and the first best."""
    evaluator.batch = state.batch
    start_logits = None
    if eval_set is not None:
        state.start_metrics, start_logits = evaluator.measure(eval_set)
        log(f"start: eval {fmt(state.start_metrics)}")
    if cfg.prompt != "auto":
        bundle.encoder.template = cfg.prompt
    if cfg.head_init == "lp":
        hs = head_start(m, bundle, evaluator, train_set, state.tensors, cfg.lp_examples, cfg.seed,
                        cfg.prompt == "auto", eval_set, start_logits, log, cfg.select)
        state.start, state.lp_metrics, state.prompt_search = hs.tensors, hs.metrics, hs.prompt_search
    state.prompt_template = bundle.encoder.template
    begin = state.lp_metrics or state.start_metrics
    if begin is not None:
        state.best_score = score(begin, cfg.select)
        state.history.append({"step": 0, **{f"eval_{k}": v for k, v in begin.items()}})
        state.best = {k: v.copy() for k, v in state.tensors.items()}
