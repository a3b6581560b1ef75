"""The Flower ServerApp: zoedge's seed-pool ZO or adapter FedAvg over Flower SuperNodes (zoedge.flower.strategy).

Its settings are the Flower app's run config (apps/flower/pyproject.toml, [tool.flwr.app.config]; override with
`flwr run apps/flower SUPERLINK --run-config 'bundle="/abs/bundle" out-dir="/abs/out"'`):
    mode                 seed-pool | fedavg
    num-server-rounds    rounds
    bundle, out-dir      the server's copy of the bundle; where each round's global patch is written (absolute)
    steps, batch-size    each device's ZO steps per round and minibatch
    lr, eps              0 = the bundle kind's default recipe
    head-init            none | lp (round 1 only; later rounds continue the global's head)
    roles                "" (all trainables) or e.g. "lora_B,head"
    seed                 the run's seed (each device and round derives its own from it)
    seed-pool-k          K, the pool size (seed-pool mode; the zoedge server takes SEED_POOL_K)
    min-nodes            nodes to wait for and to sample each round
    fraction-evaluate    share of nodes asked to evaluate each global (0: none)
At the end OUT/result.json holds the rounds' aggregated train and evaluate metrics and the final global's digest.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from zoedge.constants import SEED_POOL_K
from zoedge.errors import ZoedgeError
from zoedge.flower import records
from zoedge.flower.strategy import AdapterFedAvg, SeedPoolZO, ZoedgeStrategy
from zoedge.fsio import write_json_atomic
from zoedge.runtime.bundle import Bundle

app = ServerApp()

TRAIN_KEYS = ("steps", "batch-size", "head-init", "roles", "seed")  # passed to every device as they are


def strategy_for(rc: dict) -> ZoedgeStrategy:
    mode = str(rc.get("mode", ""))
    if mode not in records.MODES:
        raise ZoedgeError(f"run config: mode {mode!r}: choose one of {', '.join(records.MODES)}")
    for key in ("bundle", "out-dir"):
        if not str(rc.get(key, "")) or not Path(str(rc[key])).is_absolute():
            raise ZoedgeError(f"run config: {key!r} must be an absolute path (flwr run ... --run-config "
                              f"'{key}=\"/abs/path\"')")
    bundle = Bundle.open(str(rc["bundle"]))
    roles = [r for r in str(rc.get("roles", "")).split(",") if r] or None
    nodes = int(rc.get("min-nodes", 2))
    fraction = float(rc.get("fraction-evaluate", 1.0))
    common = {"fraction_evaluate": fraction, "min_train_nodes": nodes, "min_available_nodes": nodes,
              "min_evaluate_nodes": nodes if fraction > 0 else 0}
    out = Path(str(rc["out-dir"]))
    if mode == "seed-pool":
        return SeedPoolZO(bundle, out, int(rc.get("seed-pool-k", SEED_POOL_K)), roles, **common)
    return AdapterFedAvg(bundle, out, roles, **common)


def train_config(rc: dict) -> ConfigRecord:
    cfg = {k: rc[k] for k in TRAIN_KEYS if k in rc}
    cfg.update({k: float(rc[k]) for k in ("lr", "eps") if float(rc.get(k, 0) or 0) > 0})
    return ConfigRecord(cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    strategy = strategy_for(rc)
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(),
                            num_rounds=int(rc.get("num-server-rounds", 2)), train_config=train_config(rc),
                            evaluate_config=ConfigRecord())
    write_json_atomic(strategy.out / "result.json", {
        "mode": strategy.mode, "run_id": context.run_id, "rounds": int(rc.get("num-server-rounds", 2)),
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "adapter_sha256": strategy.digest})
