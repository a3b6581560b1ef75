"""`zoedge train`: zeroth-order fine-tuning of a bundle's trainable inputs on local data.

The loop, in order each step: learning rate -> batch -> perturb/forward(+)/forward(-)/restore per
perturbation -> divergence guard -> update -> trajectory -> eval -> snapshot/checkpoint -> stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import OUTPUT_FEATURES, OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS, Manifest
from zoedge.runtime import objectives
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from zoedge.runtime.data import label_indices, read_examples
from zoedge.runtime.forward import BoundForward, open_forward
from zoedge.runtime.memory import current_rss_mb, parse_size, peak_rss_mb, plan_batch
from zoedge.runtime.patch import PATCH_FILES, write_patch
from zoedge.runtime.probe import choose_l2, fit_linear_probe
from zoedge.runtime.zo import OPTIMIZERS, DirectionCache, OptimizerState, ZOConfig, clip_grads, perturbation_cycle, update

PROMPT_SEARCH_EXAMPLES = 2000  # labelled examples per candidate template when the device picks its prompt
MAX_FAILED_ROLLBACKS = 12  # consecutive rollbacks to the same good state before giving up
KEEP_Z_BYTES = 64 << 20  # keep a step's z in memory below this many bytes of trainables, else regenerate


@dataclass
class TrainConfig:
    steps: int | None = None
    batch_size: int = 16
    lr: float | None = None
    eps: float | None = None
    perturbations: int = 1
    batched: bool = False
    optimizer: str = "zo-sgd"
    objective: str | None = None
    head_init: str | None = None  # "lp" | "none"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | linear | cosine
    clip: float = 0.0
    eval_every: int | None = None
    eval_limit: int = 0
    patience: int = 0  # evals without improvement before stopping; 0 = never
    checkpoint_every: int = 100
    keep: str = "best"  # best (by eval) | last
    seed: int = 0
    max_memory: str | None = None
    lp_examples: int | None = None  # the head start uses up to this many training examples (default: by bundle kind)
    roles: list[str] | None = None  # train only trainables with these roles (e.g. lora_B,head); None = all
    prompt: str | None = None  # decoder classify: "auto" (choose among the manifest's candidates), or a template


def default_recipe(m: Manifest) -> dict[str, Any]:
    """Per-bundle-kind defaults (the recipe a user gets by typing nothing); measurements in docs/learning.md."""
    lora = "lora" in m.trainable_kinds
    if m.task == "lm":
        return {"lr": 1e-4 if lora else 1e-6, "eps": 1e-2 if lora else 1e-3, "steps": 500, "objective": "lm"}
    # The linear-probe head start is the measured lever for both kinds (MiniLM 2k -> 30k examples: 75 -> 81%;
    # SmolLM2 2k examples: 78.4% zero-shot -> 80.5%). It needs a head with a bias; decoder bundles exported
    # before the label head had one start from the prompt's zero-shot head instead.
    lp = any(t.role == "head" and len(t.shape) == 1 for t in m.trainables)
    if m.kind == "encoder":  # lr 2e-4 was the largest stable for 3,000 steps on MiniLM LoRA
        return {"lr": 2e-4 if lora else 1e-3, "eps": 1e-2, "steps": 500, "objective": "ce",
                "head_init": "lp" if lp else "none", "lp_examples": 30000}  # ~5 ms per example, one thread
    return {"lr": 1e-4 if lora else 1e-5, "eps": 1e-2, "steps": 500, "objective": "ce",
            "head_init": "lp" if lp else "none", "lp_examples": 8000}  # SmolLM2: ~60 ms per example, one thread


def resolve(cfg: TrainConfig, m: Manifest) -> TrainConfig:
    d = default_recipe(m)
    cfg = TrainConfig(**asdict(cfg))
    cfg.lr = d["lr"] if cfg.lr is None else cfg.lr
    cfg.eps = d["eps"] if cfg.eps is None else cfg.eps
    cfg.steps = d["steps"] if cfg.steps is None else cfg.steps
    cfg.objective = cfg.objective or d["objective"]
    cfg.head_init = cfg.head_init or d.get("head_init", "none")
    cfg.lp_examples = cfg.lp_examples or d.get("lp_examples", 30000)
    if cfg.prompt is not None and cfg.prompt != "auto":
        if not (m.kind == "decoder" and m.task == "classify"):
            raise ZoedgeError("bad --prompt: only decoder classify bundles read their input through a prompt")
        if "{sentence}" not in cfg.prompt:
            raise ZoedgeError("bad --prompt: the template must contain {sentence} (or say auto)")
    cfg.prompt = cfg.prompt or "auto"
    cfg.eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 10)
    if cfg.optimizer not in OPTIMIZERS:
        raise ZoedgeError(f"bad --optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.objective not in objectives.OBJECTIVES:
        raise ZoedgeError(f"bad --objective {cfg.objective!r}: choose one of {', '.join(objectives.OBJECTIVES)}")
    if (cfg.objective == "lm") != (m.task == "lm"):
        raise ZoedgeError(f"bad --objective {cfg.objective!r} for a {m.task} bundle")
    if cfg.head_init not in ("lp", "none"):
        raise ZoedgeError(f"bad --head-init {cfg.head_init!r}: choose lp or none")
    heads = [t for t in m.trainables if t.role == "head"]
    if cfg.head_init == "lp" and not heads:
        raise ZoedgeError("--head-init lp needs a bundle whose head is trainable (export with --trainable ...,head)")
    if cfg.head_init == "lp" and not any(len(t.shape) == 1 for t in heads):
        raise ZoedgeError("--head-init lp needs a head with a bias (this decoder bundle's label head has none: "
                          "re-export it with this zoedge, or start from its zero-shot prompt with --head-init none)")
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        raise ZoedgeError(f"bad --lr-schedule {cfg.lr_schedule!r}")
    if cfg.roles is not None:
        have = {t.role for t in m.trainables}
        if not cfg.roles or not set(cfg.roles) <= have:
            raise ZoedgeError(f"bad --roles {','.join(cfg.roles)}: this bundle's trainables have roles "
                              f"{', '.join(sorted(have))}")
    if cfg.keep not in ("best", "last"):
        raise ZoedgeError(f"bad --keep {cfg.keep!r}: choose best or last")
    for name in ("steps", "batch_size", "perturbations", "lp_examples"):
        if getattr(cfg, name) < 1:
            raise ZoedgeError(f"bad --{name.replace('_', '-')}: must be >= 1")
    if not (cfg.lr > 0 and cfg.eps > 0):
        raise ZoedgeError("bad --lr/--eps: must be > 0")
    if cfg.batched and not m.copies:
        raise ZoedgeError("--batched needs a bundle exported with a copies axis (zoedge export --copies 2q); "
                          "this bundle has none")
    if m.copies:  # a copies bundle always trains batched: q = copies / 2 perturbations per forward
        cfg.batched, cfg.perturbations = True, m.copies // 2
    return cfg


def lr_at(cfg: TrainConfig, step: int) -> float:
    frac = (step - 1) / max(cfg.steps, 1)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr


def batch_indices(run_seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The step's minibatch, a pure function of (seed, step): resume needs no data-order state."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run_seed, step, 0x5EED])))
    return rng.choice(n, size=min(batch, n), replace=False)


@dataclass
class Dataset:
    texts: list[str]
    labels: np.ndarray | None


def load_dataset(path: str | Path, m: Manifest, limit: int = 0) -> Dataset:
    ex = read_examples(path, need_labels=m.task == "classify", limit=limit or None)
    labels = np.asarray(label_indices(ex, m.labels, path), dtype=np.int64) if m.task == "classify" else None
    return Dataset(ex.texts, labels)


class Evaluator:
    """Accuracy / loss of the current tensors on a dataset, in batches."""

    def __init__(self, bundle: Bundle, fwd: BoundForward, batch: int = 16):
        self.bundle, self.fwd, self.batch = bundle, fwd, batch

    def outputs(self, texts: list[str], names: tuple[str, ...]) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, len(texts), self.batch):
            ids, mask = self.bundle.encoder(texts[i:i + self.batch])
            for p, o in zip(parts, self.fwd(ids, mask, names)):
                p.append(o)
        return [np.concatenate(p) for p in parts]

    def __call__(self, data: Dataset) -> dict[str, float]:
        if data.labels is not None:
            (logits,) = self.outputs(data.texts, (OUTPUT_LOGITS,))
            return {"accuracy": objectives.accuracy(logits, data.labels),
                    "loss": objectives.cross_entropy(logits, data.labels),
                    "f1": objectives.macro_f1(logits, data.labels)}
        nll, n = self.outputs(data.texts, (OUTPUT_NLL, OUTPUT_TOKENS))
        loss = objectives.lm_loss(nll, n)
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50)))}


def _score(metrics: dict[str, float]) -> float:
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def train(bundle_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, eval_path: str | Path | None = None,
          resume: bool = False, on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    cfg = resolve(cfg, m)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZoedgeError(f"--out {out}: exists and is not a directory")
    _remove_stale_temporaries(out)  # left by a kill during an atomic write; never a complete file
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise ZoedgeError(f"--resume: {out} has no {CHECKPOINT_FILE}")
    elif out.is_dir() and any(out.iterdir()):
        raise ZoedgeError(f"--out {out}: directory is not empty (use --resume to continue a run, or another --out)")
    train_set = load_dataset(data, m)
    eval_set = load_dataset(eval_path, m, cfg.eval_limit) if eval_path else None

    tensors = bundle.initial_trainables()
    initial_head = {t.name: tensors[t.name].copy() for t in m.trainables if t.role == "head"}
    roles = {t.name: t.role for t in m.trainables}
    fwd = open_forward(bundle, tensors)
    # Evaluate at the training batch size: onnxruntime's arena keeps the largest batch's memory.
    evaluator = Evaluator(bundle, fwd, batch=cfg.batch_size)
    zo_cfg = ZOConfig(optimizer=cfg.optimizer, eps=cfg.eps, perturbations=cfg.perturbations,
                      weight_decay=cfg.weight_decay, clip=cfg.clip, inplace=not cfg.batched, roles=cfg.roles)
    moving = zo_cfg.select(tensors, roles)  # the arrays ZO perturbs and updates (shared with `tensors`)
    nbytes = sum(t.nbytes for t in tensors.values())
    dirs = DirectionCache([(n, tuple(t.shape)) for n, t in moving.items()], keep=nbytes <= KEEP_Z_BYTES)
    opt = OptimizerState()
    run_seed = cfg.seed
    train_outputs = (OUTPUT_LOGITS,) if m.task == "classify" else (OUTPUT_NLL, OUTPUT_TOKENS)

    batch = cfg.batch_size
    if cfg.max_memory:
        batch = _plan_memory(bundle, fwd, parse_size(cfg.max_memory) / 2**20, batch, nbytes, cfg, log)
        evaluator.batch = batch

    def loss_of(outs: list[np.ndarray], y) -> float:
        if m.task == "classify":
            return objectives.classification_loss(cfg.objective, outs[0], y)
        return objectives.lm_loss(outs[0], outs[1])

    def loss_on(ids, mask, y) -> Callable[[], float]:
        return lambda: loss_of(fwd(ids, mask, train_outputs), y)

    def batched_losses(ids, mask, y, step: int) -> list[float]:
        """All 2q perturbed evaluations in one forward over the copies axis (P-RGE)."""
        zs = [dict(dirs(run_seed, step, i)) for i in range(cfg.perturbations)]
        fwd.load_perturbations(zs, cfg.eps)
        outs = fwd.run_copies(ids, mask, train_outputs)
        return [loss_of([o[c] for o in outs], y) for c in range(m.copies)]

    # ---- start: fresh (head start + eval) or from a checkpoint ----------------------------------
    state: dict[str, Any]
    start: dict[str, np.ndarray] = {}
    best: dict[str, np.ndarray] = {}
    trajectory: list[list[float]] = []
    if resume:
        groups, traj, state = load_checkpoint(out)
        if state.get("bundle_id") != m.bundle_id or state.get("config") != _config_key(cfg):
            raise ZoedgeError(f"--resume: {out} holds a run of another bundle or with other settings")
        bundle.encoder.template = state.get("prompt_template") or bundle.encoder.template
        for k, v in groups["tensors"].items():
            np.copyto(tensors[k], v)
        opt.buffers = groups["optimizer"]
        opt.step = state["step"]
        start, best = groups["start"], groups["best"]
        trajectory = traj.tolist()
        log(f"resuming at step {state['step']} of {cfg.steps}")
    else:
        state = {"step": 0, "lr_scale": 1.0, "loss_ref": None, "rollbacks": 0, "history": [], "best_step": 0,
                 "best_score": None, "evals_since_best": 0, "start_metrics": None, "lp_metrics": None,
                 "bundle_id": m.bundle_id, "config": _config_key(cfg)}
        if eval_set is not None:
            state["start_metrics"] = evaluator(eval_set)
            log(f"start: eval {_fmt(state['start_metrics'])}")
        if cfg.prompt != "auto":
            bundle.encoder.template = cfg.prompt
        given_template = bundle.encoder.template  # the prompt search may change it
        if cfg.head_init == "lp":
            search = m.prompt_candidates if cfg.prompt == "auto" and len(m.prompt_candidates) > 1 else []
            start, state["prompt_search"] = _linear_probe(m, bundle, evaluator, train_set, tensors, cfg.lp_examples,
                                                          run_seed, search, log)
            if eval_set is not None:
                state["lp_metrics"] = evaluator(eval_set)
                log(f"linear-probe head: eval {_fmt(state['lp_metrics'])}")
                if _score(state["lp_metrics"]) < _score(state["start_metrics"]):
                    # Never start below the exported bundle: on SmolLM2 a probe fitted on 2,000 phrases scored
                    # 72.8% on test against the prompt's 78.9% zero-shot (docs/learning.md).
                    for k in start:
                        np.copyto(tensors[k], initial_head[k])
                    start, state["lp_metrics"] = {}, None
                    bundle.encoder.template = given_template
                    log("linear-probe head scored below the exported head on the eval data: keeping the exported head")
        state["prompt_template"] = bundle.encoder.template
        begin = state["lp_metrics"] or state["start_metrics"]
        if begin is not None:
            state["best_score"] = _score(begin)
            state["history"].append({"step": 0, **{f"eval_{k}": v for k, v in begin.items()}})
        best = {k: v.copy() for k, v in tensors.items()}
        out.mkdir(parents=True, exist_ok=True)
    snapshot = _snapshot(tensors, opt, trajectory, state)
    snapshot_every = cfg.checkpoint_every or 100

    # ---- the loop ---------------------------------------------------------------------------------
    step = state["step"]
    stopped_early = False
    while step < cfg.steps:
        step += 1
        lr = float(np.float32(lr_at(cfg, step) * state["lr_scale"]))
        idx = batch_indices(run_seed, step, len(train_set.texts), batch)
        ids, mask = bundle.encoder([train_set.texts[i] for i in idx])
        y = train_set.labels[idx] if train_set.labels is not None else None
        grads, losses = [], []
        if cfg.batched:
            losses = batched_losses(ids, mask, y, step)
            grads = [(losses[2 * i] - losses[2 * i + 1]) / (2 * cfg.eps) for i in range(cfg.perturbations)]
        else:
            f = loss_on(ids, mask, y)
            for i in range(cfg.perturbations):
                lp, lm = perturbation_cycle(moving, dirs, run_seed, step, i, cfg.eps, loss_at=f)
                grads.append((lp - lm) / (2 * cfg.eps))
                losses += [lp, lm]
        loss = float(np.mean(losses))
        if _diverged(losses, grads, state, cfg.objective):
            step = _rollback(snapshot, tensors, opt, trajectory, state)
            state["lr_scale"] *= 0.5
            state["rollbacks"] += 1
            state["failed_rollbacks"] = state.get("failed_rollbacks", 0) + 1
            log(f"divergence guard: loss {loss:.4g} at step {step + 1}; rolled back to step {step}, "
                f"lr x{state['lr_scale']:g}")
            if state["failed_rollbacks"] > MAX_FAILED_ROLLBACKS:
                raise ZoedgeError(f"training diverged {MAX_FAILED_ROLLBACKS} times in a row from step {step} "
                                  "even with a lower learning rate; try a smaller --lr or --eps")
            continue
        grads = clip_grads(grads, cfg.clip)
        update(moving, opt, zo_cfg, roles, dirs, run_seed, step, grads, lr)
        trajectory.append([*grads, lr])
        state["step"] = step
        ref = state["loss_ref"]
        state["loss_ref"] = loss if ref is None else 0.95 * ref + 0.05 * loss
        floor = state.get("loss_floor")
        state["loss_floor"] = state["loss_ref"] if floor is None else min(floor, state["loss_ref"])
        record = {"step": step, "loss": loss, "lr": lr, "projected_grad": float(np.mean(grads))}
        if eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics = evaluator(eval_set)
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            state["history"].append(record)
            score = _score(metrics)
            if state["best_score"] is None or score > state["best_score"]:
                state.update(best_score=score, best_step=step, evals_since_best=0)
                best = {k: v.copy() for k, v in tensors.items()}
            else:
                state["evals_since_best"] += 1
            if cfg.patience and state["evals_since_best"] >= cfg.patience:
                stopped_early = True
        if on_step:
            on_step({**record, "total": cfg.steps, "rss_mb": peak_rss_mb()})
        if step % snapshot_every == 0 or stopped_early or step == cfg.steps:
            state["failed_rollbacks"] = 0  # progress: a new good state
            snapshot = _snapshot(tensors, opt, trajectory, state)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or stopped_early or step == cfg.steps):
                save_checkpoint(out, {"tensors": tensors, "optimizer": opt.buffers, "start": start, "best": best},
                                np.asarray(trajectory, dtype=np.float32).reshape(-1, cfg.perturbations + 1), state)
        if stopped_early:
            log(f"early stop at step {step}: no eval improvement in {cfg.patience} evals")
            break

    # ---- the patch ------------------------------------------------------------------------------------
    use_best = cfg.keep == "best" and eval_set is not None
    final_step = state["best_step"] if use_best else state["step"]
    final = best if use_best else tensors
    traj = np.asarray(trajectory[:final_step], dtype=np.float32).reshape(-1, cfg.perturbations + 1)
    final_metrics = next((h for h in state["history"] if h["step"] == final_step), None) if use_best else None
    if eval_set is not None and final_metrics is None:
        final_metrics = {f"eval_{k}": v for k, v in evaluator(eval_set).items()}
    seconds = time.perf_counter() - t0
    metrics = {
        "eval_accuracy_start": (state["start_metrics"] or {}).get("accuracy"),
        "eval_accuracy_head_start": (state["lp_metrics"] or {}).get("accuracy"),
        "eval_accuracy": (final_metrics or {}).get("eval_accuracy"),
        "eval_loss": (final_metrics or {}).get("eval_loss"),
        "history": state["history"],
    }
    meta = {
        "steps": int(final_step), "steps_run": int(state["step"]), "run_seed": run_seed, "zo": zo_cfg.to_dict(),
        "examples": len(train_set.texts), "metrics": metrics, "seconds": seconds,
        "hyperparameters": {**asdict(cfg), "batch_size": batch}, "rollbacks": state["rollbacks"],
        "forward_passes": fwd.calls, "optimizer_state_bytes": opt.nbytes(),
    }
    if m.kind == "decoder" and m.task == "classify":
        meta["prompt_template"] = bundle.encoder.template  # the patch is read through this prompt
        if state.get("prompt_search"):
            meta["prompt_search"] = state["prompt_search"]
    write_patch(out, m, final, traj, start, meta)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    result = {
        "steps": int(final_step), "steps_run": int(state["step"]), "seconds": round(seconds, 2),
        "eval_accuracy_start": metrics["eval_accuracy_start"], "eval_accuracy_head_start": metrics["eval_accuracy_head_start"],
        "eval_accuracy": metrics["eval_accuracy"], "peak_rss_mb": round(peak_rss_mb(), 1), "forward_passes": fwd.calls,
        "batch_size": batch, "rollbacks": state["rollbacks"], "optimizer_state_bytes": opt.nbytes(),
        "patch": str(out), "history": state["history"],
    }
    if "prompt_template" in meta:
        result["prompt_template"] = meta["prompt_template"]
    return result


# ---- helpers -----------------------------------------------------------------------------------------


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.NAME.xxxx` temporaries of our own atomic writes (a SIGKILL mid-write leaves them behind)."""
    if not out.is_dir():
        return
    ours = (CHECKPOINT_FILE, *PATCH_FILES)
    for p in out.iterdir():
        if p.is_file() and any(p.name.startswith(f".{name}.") for name in ours):
            p.unlink(missing_ok=True)


def _config_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the original (everything that changes the trajectory)."""
    d = asdict(cfg)
    for k in ("max_memory", "checkpoint_every"):
        d.pop(k)
    return d


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _diverged(losses: list[float], grads: list[float], state: dict, objective: str) -> bool:
    """NaN / Inf, or a loss far above its running mean. Right after a rollback only NaN / Inf counts until
    the next good snapshot: the retried step sees the same batch, and a hard batch is not a divergence."""
    if not all(math.isfinite(x) for x in losses + grads):
        return True
    ref = state.get("loss_floor", state["loss_ref"])  # the lowest running mean: a slow climb cannot raise it
    if ref is None or objective in ("accuracy", "f1") or state.get("failed_rollbacks", 0) > 0:
        return False
    return min(losses) > 3.0 * abs(ref) + 1.0


def _snapshot(tensors, opt: OptimizerState, trajectory: list, state: dict) -> dict:
    return {"tensors": {k: v.copy() for k, v in tensors.items()},
            "optimizer": {k: v.copy() for k, v in opt.buffers.items()},
            "trajectory_len": len(trajectory), "step": state["step"], "loss_ref": state["loss_ref"]}


def _rollback(snapshot: dict, tensors, opt: OptimizerState, trajectory: list, state: dict) -> int:
    for k, v in snapshot["tensors"].items():
        np.copyto(tensors[k], v)
    opt.buffers = {k: v.copy() for k, v in snapshot["optimizer"].items()}
    opt.step = snapshot["step"]
    del trajectory[snapshot["trajectory_len"]:]
    state["step"] = snapshot["step"]
    state["loss_ref"] = snapshot["loss_ref"]
    return snapshot["step"]


def _linear_probe(m: Manifest, bundle: Bundle, evaluator: Evaluator, data: Dataset, tensors, limit: int, seed: int,
                  candidates: list[str], log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """Fit the head on the frozen features of up to `limit` training examples; returns the new head tensors.

    With prompt candidates (decoders), first pick the template whose features give the best held-out probe
    accuracy on the first PROMPT_SEARCH_EXAMPLES of those examples, and leave it set on `bundle.encoder`."""
    n = len(data.texts)
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(n)[:limit] if n > limit else np.arange(n)
    texts, labels = [data.texts[i] for i in idx], data.labels[idx]
    k = min(PROMPT_SEARCH_EXAMPLES, len(idx))
    searched: list[dict] = []
    cached: dict[str, np.ndarray] = {}
    if candidates and k >= 50:
        for template in candidates:
            bundle.encoder.template = template
            (cached[template],) = evaluator.outputs(texts[:k], (OUTPUT_FEATURES,))
            _, scores = choose_l2(cached[template], labels[:k], len(m.labels), seed)
            searched.append({"prompt_template": template, "held_out_accuracy": max(scores.values())})
        chosen = max(searched, key=lambda r: r["held_out_accuracy"])  # ties: the earlier candidate
        bundle.encoder.template = chosen["prompt_template"]
        log(f"prompt: {chosen['prompt_template']!r} (held-out probe accuracy {chosen['held_out_accuracy']:.3f} on {k} "
            f"examples; {len(candidates)} candidates)")
    head_part = cached.get(bundle.encoder.template)
    done = 0 if head_part is None else len(head_part)
    parts = [] if head_part is None else [head_part]
    if done < len(texts):
        parts += evaluator.outputs(texts[done:], (OUTPUT_FEATURES,))
    features = np.concatenate(parts)
    l2, _ = choose_l2(features, labels, len(m.labels), seed)
    w, b = fit_linear_probe(features, labels, len(m.labels), l2=l2)
    head = [t for t in m.trainables if t.role == "head"]
    start = {}
    for t in head:
        value = w if len(t.shape) == 2 else b
        np.copyto(tensors[t.name], value.astype(np.float32))
        start[t.name] = tensors[t.name].copy()
    return start, searched


def _plan_memory(bundle: Bundle, fwd: BoundForward, budget_mb: float, requested: int, nbytes: int,
                 cfg: TrainConfig, log) -> int:
    """Measure RSS growth of forwards at max length for batch 1 and 2, extrapolate, pick a batch that fits."""
    length = bundle.manifest.max_length
    ids = np.full((1, length), 100, dtype=np.int64)
    mask = np.ones((1, length), dtype=np.int64)
    outs = (OUTPUT_LOGITS,) if bundle.manifest.task == "classify" else (OUTPUT_NLL, OUTPUT_TOKENS)
    fwd(ids, mask, outs)
    r1 = max(current_rss_mb(), peak_rss_mb())
    fwd(np.repeat(ids, 4, 0), np.repeat(mask, 4, 0), outs)
    r4 = max(current_rss_mb(), peak_rss_mb())
    per_example = max((r4 - r1) / 3.0, 0.05)
    state_mb = nbytes * (1 if cfg.optimizer == "zo-sgd" else 2 if cfg.optimizer == "zo-momentum" else 3) / 2**20
    fixed = r1 - per_example + state_mb * 2  # + a snapshot copy and the optimizer state
    batch = plan_batch(budget_mb, fixed, per_example, requested)
    if batch < requested:
        log(f"--max-memory {budget_mb:.0f}MB: batch size {requested} -> {batch} "
            f"(~{fixed:.0f}MB fixed + {per_example:.1f}MB per example)")
    return batch
