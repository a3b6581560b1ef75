"""The Flower ClientApp: a zoedge device in a Flower fleet (numpy + onnxruntime; never torch).

Each SuperNode is one device, started with its own files in --node-config:
    flower-supernode --insecure --superlink HOST:PORT \\
        --node-config 'bundle="/dev/bundle" data="/dev/train.tsv" eval="/dev/dev.tsv" work="/dev/flower"'
`bundle` (a zoedge bundle directory; any sibling of the server's) and `data` (its labelled training file) are
required; `eval` (a labelled file for the evaluate round) and `work` (where the rounds' patches are kept, under
WORK/RUN_ID/; default: TMPDIR/zoedge-flower/NODE_ID) are optional.

train: the message holds the global model (zoedge.flower.records) and the round's settings (mode, steps, lr, eps,
batch-size, head-init, roles, seed). The device writes the global as a patch at RUN/round-N/global (RUN =
WORK/RUN_ID), then runs `zoedge.runtime.trainer.train` into RUN/round-N/patch and replies with its update:
* seed-pool: the global is rebuilt from its coefficients (its digest must equal the server's "adapter-sha256",
  else the device refuses); the run continues it (`--seed-pool-from`, so its coefficients start from the
  global's) unless the global is still the bundle itself (round 1: `head-init` applies); the reply is the
  patch's K coefficients and head start;
* fedavg: the run trains a bundle whose initial trainables are the global's tensors
  (zoedge.device.rebase.derive_bundle, as the zoedge agent does); the reply is the patch's adapter tensors.
evaluate: the global is rebuilt (written at RUN/eval-N/global) and scored on `eval` (zoedge.runtime.evaluate).
Each round also leaves RUN/round-N/client.json: what the device sent and which heavy modules it had loaded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from zoedge.device.rebase import derive_bundle
from zoedge.errors import ZoedgeError
from zoedge.fsio import write_json_atomic
from zoedge.flower import records
from zoedge.patchdoc import ADAPTER_FILE, START_FILE, PatchDoc
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.evaluate import evaluate as evaluate_patch
from zoedge.runtime.seedpool import load_coefficients, pool_id
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.trainer import TrainConfig, train as train_run

app = ClientApp()

# Recorded in client.json each round: torch, transformers and onnx are never loaded on a device (zoedge.runtime);
# fastapi is, by Flower's own ClientApp process (flwr 1.42's runtime API), not by zoedge.
HEAVY = ("torch", "transformers", "onnx", "fastapi")


@dataclass
class Device:
    bundle: Bundle
    data: Path
    eval: Path | None
    work: Path

    @classmethod
    def from_context(cls, context: Context) -> "Device":
        cfg = context.node_config
        for key in ("bundle", "data"):
            if not isinstance(cfg.get(key), str) or not cfg[key]:
                raise ZoedgeError(f"node config: {key!r} (a path) is required, e.g. flower-supernode "
                                  f"--node-config '{key}=\"/path\"'")
        work = cfg.get("work") or str(Path(tempfile.gettempdir()) / "zoedge-flower" / str(context.node_id))
        return cls(Bundle.open(str(cfg["bundle"])), Path(str(cfg["data"])),
                   Path(str(cfg["eval"])) if cfg.get("eval") else None, Path(str(work)))


def roles_of(config: ConfigRecord) -> list[str] | None:
    roles = str(config.get("roles", "") or "")
    return [r for r in roles.split(",") if r] or None


def run_seed(config: ConfigRecord, node_id: int, server_round: int) -> int:
    """Each device and round draws its own pool seeds and minibatches (a pure function of the three)."""
    words = np.random.SeedSequence([int(config.get("seed", 0)), node_id, server_round]).generate_state(1)
    return int(words[0] % np.uint32(2**31))


def global_patch(device: Device, content: RecordDict, out: Path, where: str) -> tuple[PatchDoc, bool]:
    """Write the message's global model as a patch at `out`; (its doc, whether it differs from the bundle)."""
    config = content[records.CONFIG]
    mode = str(config.get("mode", ""))
    m = device.bundle.manifest
    if mode == "seed-pool":
        k = int(config["seed-pool-k"])
        if int(config["seed-pool-id"]) != pool_id(m):
            raise ZoedgeError(f"{where}: the server's seed pool {config['seed-pool-id']} is not this bundle's "
                              f"pool {pool_id(m)} (another bundle, not a sibling)")
        c, start = records.read_seed_pool(content[records.ARRAYS], device.bundle, k, where)
        doc = records.write_seed_pool_patch(out, device.bundle, c, start, roles_of(config), kind="global",
                                            version=int(config.get("server-round", 0)))
        want = str(config.get("adapter-sha256", ""))
        if want and doc.adapter_sha256 != want:
            raise ZoedgeError(f"{where}: the global's coefficients rebuild to {doc.adapter_sha256[:12]} here, "
                              f"{want[:12]} on the server: refused")
        return doc, bool(np.any(c) or start)
    if mode == "fedavg":
        tensors = records.read_tensors(content[records.ARRAYS], device.bundle, where)
        doc = records.write_adapter_patch(out, device.bundle, tensors, version=int(config.get("server-round", 0)))
        return doc, doc.adapter_sha256 != m.initial_sha256
    raise ZoedgeError(f"{where}: unknown mode {mode!r} (choose one of {', '.join(records.MODES)})")


def train_config(config: ConfigRecord, seed: int, **extra) -> TrainConfig:
    """The round's TrainConfig; extra overrides (seed-pool settings, head_init="none" after round 1)."""
    fields = {"steps": int(config.get("steps", 100)), "batch_size": int(config.get("batch-size", 16)),
              "lr": float(config["lr"]) if "lr" in config else None,
              "eps": float(config["eps"]) if "eps" in config else None,
              "head_init": str(config.get("head-init", "none")), "roles": roles_of(config), "seed": seed,
              "keep": "last", "checkpoint_every": 0}
    return TrainConfig(**{**fields, **extra})


@app.train()
def train(msg: Message, context: Context) -> Message:
    device = Device.from_context(context)
    config = msg.content[records.CONFIG]
    rnd = int(config.get("server-round", 0))
    work = device.work / str(context.run_id) / f"round-{rnd}"
    if work.exists():  # a message sent again (a SuperNode restart) trains again from the same global
        shutil.rmtree(work)
    where = f"round {rnd}"
    glob, moved = global_patch(device, msg.content, work / "global", where)
    seed = run_seed(config, context.node_id, rnd)
    patch = work / "patch"
    if config["mode"] == "seed-pool":
        k = int(config["seed-pool-k"])
        extra = {"seed_pool": k, "seed_pool_from": str(work / "global"), "head_init": "none"} if moved else \
            {"seed_pool": k}
        result = train_run(device.bundle.path, device.data, patch, train_config(config, seed, **extra),
                           log=lambda *_: None)
        start = load_tensors(patch / START_FILE) if (patch / START_FILE).is_file() else {}
        update = records.seed_pool_record(load_coefficients(patch, k), start)
    else:
        on = derive_bundle(device.bundle.path, work / "global", work / "derived") if moved else device.bundle.path
        cfg = train_config(config, seed, **({"head_init": "none"} if moved else {}))
        result = train_run(on, device.data, patch, cfg, log=lambda *_: None)
        update = records.tensors_record(load_tensors(patch / ADAPTER_FILE))
    doc = PatchDoc.load(patch)
    metrics = {records.WEIGHT: doc.examples, "steps": int(result["steps"]), "train-seconds": float(result["seconds"])}
    write_json_atomic(work / "client.json", {
        "round": rnd, "mode": config["mode"], "global_adapter_sha256": glob.adapter_sha256,
        "continued": moved, "run_seed": seed, "adapter_sha256": doc.adapter_sha256, "examples": doc.examples,
        "heavy_modules_loaded": sorted(name for name in HEAVY if name in sys.modules)})
    content = RecordDict({records.ARRAYS: update, records.METRICS: MetricRecord(metrics),
                          records.PATCH: ConfigRecord({"adapter-sha256": doc.adapter_sha256})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    device = Device.from_context(context)
    if device.eval is None:
        raise ZoedgeError("node config: 'eval' (a labelled file) is required for the evaluate round "
                          "(or run the ServerApp with fraction-evaluate = 0)")
    rnd = int(msg.content[records.CONFIG].get("server-round", 0))
    out = device.work / str(context.run_id) / f"eval-{rnd}" / "global"
    doc, _ = global_patch(device, msg.content, out, f"evaluate round {rnd}")
    scores = evaluate_patch(device.bundle.path, device.eval, patch=out)
    metrics = {records.WEIGHT: int(scores["n"]),
               **{k: float(scores[k]) for k in ("accuracy", "loss", "perplexity") if k in scores}}
    write_json_atomic(out.parent / "client.json", {"round": rnd, "adapter_sha256": doc.adapter_sha256, **metrics})
    return Message(content=RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)

