"""The bundle commands: export, verify, inspect, train, eval, predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from zoedge.cli.errors import csv_list as _csv, fail, one_line_errors

app = typer.Typer()


def _words(value: Optional[str]) -> Optional[list[str]]:
    """Label words keep their leading spaces (" great"); accept optional surrounding quotes."""
    if value is None:
        return None
    words = [w.strip('"').strip("'") if w.strip().startswith(('"', "'")) else w for w in value.split(",")]
    return [w for w in words if w != ""]


@app.command()
@one_line_errors
def export(
    model: str = typer.Argument(..., help="minilm | smollm2-135m | tiny-bert | tiny-llama | a HF model dir | a .gguf file"),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write"),
    task: str = typer.Option("classify", help="classify | lm"),
    labels: str = typer.Option("negative,positive", help="Comma-separated label names"),
    label_words: Optional[str] = typer.Option(None, help='Decoder label words, e.g. " terrible"," great"'),
    prompt: Optional[str] = typer.Option(None, help="Decoder prompt template containing {sentence}"),
    trainable: str = typer.Option("lora,head", help="Comma-separated subset of lora, head, bias, full"),
    lora_rank: int = typer.Option(8, help="LoRA rank"),
    lora_alpha: float = typer.Option(16.0, help="LoRA alpha"),
    lora_targets: str = typer.Option("q,v", help="LoRA targets: q,k,v,o,up,down,gate or module names"),
    quant: Optional[str] = typer.Option(None, help="fp32 | fp16 | int8 | int8-token | int8-dynamic | int8-weight | int8-static | int8-smooth | int4 (default: by target; int8 = per-token int8 for encoders, weight-only for llama / gemma3 decoders)"),
    calibration: Optional[Path] = typer.Option(None, help="Text file (TSV/CSV/JSONL) for int8-static / int8-smooth calibration"),
    quant_exclude: Optional[str] = typer.Option(None, help="Regex over source module paths to keep in float, e.g. down_proj"),
    target: str = typer.Option("cpu", help="cpu | pi | jetson | phone"),
    max_length: int = typer.Option(64, help="Maximum tokens per example"),
    copies: int = typer.Option(0, help="Give LoRA/head inputs a copies axis of this size (2q) for batched ZO"),
    format: str = typer.Option("onnx", "--format", help="onnx | ort (ORT Mobile flatbuffer) | tflite (LiteRT)"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line"),
) -> None:
    """Export a model to a bundle: ONNX graph with trainable tensors as inputs, manifest, tokenizer."""
    from zoedge.export.bundle import ExportOptions, export_bundle, validate

    names = _csv(labels) or []
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        fail(f"bad --labels {labels!r}: {', '.join(repr(x) for x in twice)} given more than once (one name per class)")
    opts = ExportOptions(model=model, out=out, task=task, labels=_csv(labels) or [], label_words=_words(label_words),
                         prompt=prompt, trainable=trainable, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=_csv(lora_targets) or [], quant=quant, calibration=calibration, target=target,
                         max_length=max_length, force=force, copies=copies, format=format,
                         quant_exclude=quant_exclude)
    validate(opts)
    log = (lambda m: print(m, file=sys.stderr)) if json_out else print
    m = export_bundle(opts, log=log)
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    summary = {"bundle": str(out), "model": m.model_id, "quantization": m.quantization, "trainables": len(m.trainables),
               "trainable_values": m.num_trainable, "bytes": size}
    if json_out:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}: {m.model_id} {m.quantization}, {len(m.trainables)} trainable tensors "
              f"({m.num_trainable:,} values), {size / 1e6:.1f} MB")


@app.command()
@one_line_errors
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    data: Optional[Path] = typer.Option(None, help="Sentences to compare on (default: built-in sample)"),
    n: int = typer.Option(32, help="Number of sentences"),
    min_agreement: Optional[float] = typer.Option(None, help="Pass only at this prediction agreement or more "
                                                             "(default: 1.0 for fp32, 0.95 fp16, 0.85 quantized)"),
    max_diff: Optional[float] = typer.Option(None, help="Pass only if max |onnx - torch| is at most this "
                                                        "(default: 1e-3 for fp32, unchecked otherwise)"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Compare the bundle in onnxruntime with the source model in torch (random non-zero trainables): PASS or FAIL
    (exit 1)."""
    from zoedge.export.verify import verdict, verify_bundle

    r = verify_bundle(bundle, data=data, n=n)
    passed, why = verdict(r, min_agreement, max_diff)
    r = {**r, "passed": passed, "verdict": why}
    short = f" (--n {n} asked; {data} has {r['n']})" if r["n"] < n else ""
    if json_out:
        print(json.dumps(r))
    else:
        print(f"{bundle}: max |onnx - torch| = {r['max_abs_diff']:.3g}, prediction agreement "
              f"{r['prediction_agreement'] * 100:.1f}% on {r['n']} inputs{short} ({r['quantization']}): "
              f"{'PASS' if passed else 'FAIL'}: {why}")
    if not passed:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def inspect(bundle: Path = typer.Argument(..., help="Bundle directory")) -> None:
    """Print a human summary of a bundle's manifest; exit 2 if a file it lists is missing or altered."""
    from zoedge.runtime.inspect import describe, file_problems

    print(describe(bundle))
    problems = file_problems(bundle)
    if problems:
        fail(f"{bundle}: {'; '.join(problems)}")


def _train_option(name: str, *flags: str):
    """A `zoedge train` option whose default and help are TrainConfig's field (declared once, in runtime/config.py)."""
    from zoedge.runtime.config import TrainConfig

    f = TrainConfig.__dataclass_fields__[name]
    return typer.Option(f.default, *flags, help=f.metadata["help"])


@app.command()
@one_line_errors
def train(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    data: Path = typer.Option(..., help="Training data: TSV/CSV/JSONL with text (and label) columns"),
    out: Path = typer.Option(..., help="Patch directory to write (checkpoints live here while training)"),
    eval: Optional[Path] = typer.Option(None, "--eval", help="Held-out labelled data, evaluated every --eval-every steps"),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled", help="Unlabelled texts from the device (labels "
                                              "ignored): at the end the head's bias moves from the training set's "
                                              "label prior to theirs, estimated by EM (label shift)"),
    steps: Optional[int] = _train_option('steps'),
    batch_size: int = _train_option('batch_size'),
    lr: Optional[float] = _train_option('lr'),
    eps: Optional[float] = _train_option('eps'),
    perturbations: int = _train_option('perturbations'),
    batched: bool = _train_option('batched', "--batched"),
    optimizer: str = _train_option('optimizer'),
    objective: Optional[str] = _train_option('objective'),
    head_init: Optional[str] = _train_option('head_init'),
    lp_examples: Optional[int] = _train_option('lp_examples'),
    prompt: Optional[str] = _train_option('prompt'),
    head_lr: Optional[float] = _train_option('head_lr'),
    weight_decay: float = _train_option('weight_decay'),
    lr_schedule: str = _train_option('lr_schedule'),
    clip: float = _train_option('clip'),
    eval_every: Optional[int] = _train_option('eval_every'),
    eval_limit: int = _train_option('eval_limit'),
    patience: Optional[int] = _train_option('patience'),
    keep: str = _train_option('keep'),
    select: str = _train_option('select'),
    min_gain_se: float = _train_option('min_gain_se'),
    roles: Optional[str] = _train_option('roles'),
    max_memory: Optional[str] = _train_option('max_memory'),
    step_tokens: Optional[int] = _train_option('step_tokens'),
    checkpoint_every: int = _train_option('checkpoint_every'),
    seed: int = _train_option('seed'),
    seed_pool: int = _train_option('seed_pool'),
    seed_pool_from: Optional[str] = _train_option('seed_pool_from'),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out; start fresh when there is none "
                                                        "(one fixed command line survives a kill at any moment)"),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: training loss and eval accuracy per step, the start "
                                                   "and head-start levels, the kept step"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line"),
) -> None:
    """Fine-tune a bundle's trainable tensors with zeroth-order steps (forward passes only) -> patch."""
    from zoedge.runtime.progress import TrainProgress, summary_line
    from zoedge.runtime.config import TrainConfig
    from zoedge.runtime.loop import train as run_train

    settings = dict(locals())
    cfg = TrainConfig(**{k: settings[k] for k in TrainConfig.__dataclass_fields__})
    cfg.roles = _csv(roles)
    with TrainProgress() as progress:
        result = run_train(bundle, data, out, cfg, eval_path=eval, resume=resume, on_step=progress.update,
                           log=progress.log, unlabelled=unlabelled)
    if plot:
        from zoedge.runtime.progress import plot_history

        plot_history(result["history"], plot, steps=progress.records, result=result,
                     title=f"zoedge train {Path(bundle).name} on {Path(data).name}"
                           + (f", eval {Path(eval).name}" if eval else ""))
    summary = {k: v for k, v in result.items() if k != "history"}
    print(json.dumps(summary) if json_out else summary_line(out, result))


@app.command("eval")
@one_line_errors
def eval_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    data: Path = typer.Option(..., help="Labelled data (TSV/CSV/JSONL)"),
    patch: Optional[Path] = typer.Option(None, help="Patch directory to apply"),
    limit: int = typer.Option(0, help="Use at most N examples (0 = all)"),
    batch_size: int = typer.Option(16, help="Examples per forward"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Score a bundle, with or without a patch."""
    from zoedge.runtime.evaluate import evaluate

    r = evaluate(bundle, data, patch=patch, limit=limit, batch=batch_size)
    if json_out:
        print(json.dumps(r))
    else:
        what = "accuracy" if "accuracy" in r else "loss"
        print(f"{what} {r[what]:.4f} on {r['n']} examples (peak RSS {r['peak_rss_mb']:.0f}MB)")


@app.command()
@one_line_errors
def predict(
    bundle: Path = typer.Argument(..., help="Bundle directory (or a merged bundle from `zoedge patch merge`)"),
    data: str = typer.Option(..., help="Inputs: TSV/CSV/JSONL (a text column; a label column is optional), a plain "
                                       "text file (one input per line), or - for standard input, answered line by line"),
    patch: Optional[Path] = typer.Option(None, help="Patch directory to apply (not needed for a merged bundle)"),
    batch_size: int = typer.Option(64, help="Inputs per forward (files)"),
) -> None:
    """Predict a label for each input: one JSON line on stdout per input, {"text", "label", "probabilities"}
    (+ "expected" when the file has labels)."""
    from zoedge.runtime.predict import Predictor, predict_lines, predict_stream, read_inputs, stdin_rows

    texts, labels = (None, None) if data == "-" else read_inputs(Path(data))
    pred = Predictor(bundle, patch=patch, batch=min(batch_size, 64))
    if pred.untrained:
        print(f"zoedge: note: no --patch: these are the predictions of the exported bundle {bundle}, untrained",
              file=sys.stderr)
    if texts is None:
        summary = predict_stream(pred, stdin_rows(), sys.stdout)
    else:
        summary = predict_lines(pred, texts, labels, sys.stdout, batch=max(1, batch_size))
    if "accuracy" in summary:
        print(f"zoedge: {summary['n']} inputs, accuracy {summary['accuracy']:.4f} against the file's labels",
              file=sys.stderr)
