"""Flower strategies for zoedge devices: Flower's FedAvg does the node sampling, the messages, the round loop
(`strategy.start`) and the metric averaging; the arrays are aggregated with zoedge's own code, so a Flower global
is the zoedge server's global of the same device patches, bit for bit.

* `SeedPoolZO` (mode "seed-pool", FedKSeed): a device's update is its K coefficients over the bundle's seed pool
  (and its head start). The server rebuilds each device's tensors from them (zoedge.flower.records, the
  arithmetic of `zoedge patch replay`) and drops a reply whose rebuild is not the device's "adapter-sha256".
  The global is `zoedge.runtime.seedpool.average`: the examples-weighted mean of the vectors and head starts,
  float64 then float32. Devices get the global vector (4 KB for K = 1024, any model size) and rebuild it.
* `AdapterFedAvg` (mode "fedavg"): the devices' trained adapter tensors, averaged by
  `zoedge.server.aggregate.fedavg` (examples-weighted, float64 then float32; Flower's own FedAvg sums in float32).

Every round's global is written as a zoedge patch at OUT/round-N/global (round 0: the start), with OUT/round-N/
round.json naming the devices, their weights and digests; `zoedge eval BUNDLE --patch OUT/round-N/global` scores it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from zoedge.errors import ZoedgeError
from zoedge.flower import records
from zoedge.fsio import write_json_atomic
from zoedge.runtime import seedpool
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.tensors import tensor_digest
from zoedge.server.aggregate import fedavg


class ZoedgeStrategy(FedAvg):
    """What both modes share: the bundle the server holds, the output directory, the round's instruction."""

    mode = ""

    def __init__(self, bundle: Bundle, out: Path, roles: list[str] | None = None, **fedavg_args) -> None:
        super().__init__(weighted_by_key=records.WEIGHT, arrayrecord_key=records.ARRAYS,
                         configrecord_key=records.CONFIG, **fedavg_args)
        self.bundle, self.out, self.roles = bundle, Path(out), roles
        self.digest = bundle.manifest.initial_sha256  # of the current global's tensors

    def instruction(self, config: ConfigRecord) -> ConfigRecord:
        """The round's ConfigRecord: the run's settings, the mode and the current global's digest."""
        return ConfigRecord({**dict(config), "mode": self.mode, "adapter-sha256": self.digest})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, self.instruction(config), grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self.instruction(config), grid)

    def round_dir(self, server_round: int) -> Path:
        d = self.out / f"round-{server_round}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def accepted(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Message], MetricRecord | None]:
        """(the replies without an error, their examples-weighted metrics: Flower's average); errors are logged.
        Flower's own reply check is not used: it wants the same array keys from every device, and seed-pool
        devices may differ in head start."""
        ok = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "round %d: node %d replied with an error: %s", server_round,
                    reply.metadata.src_node_id, reply.error.reason)
            elif records.WEIGHT not in reply.content.get(records.METRICS, {}):
                log(WARNING, "round %d: node %d sent no %r metric: left out", server_round,
                    reply.metadata.src_node_id, records.WEIGHT)
            else:
                ok.append(reply)
        log(INFO, "round %d: %d replies accepted", server_round, len(ok))
        return ok, (self.train_metrics_aggr_fn([r.content for r in ok], self.weighted_by_key) if ok else None)

    def weight(self, reply: Message) -> float:
        return float(reply.content[records.METRICS][records.WEIGHT])

    def nbytes(self, reply: Message) -> int:
        """The bytes of the arrays a device sent (Flower serialises each as a .npy)."""
        return sum(len(a.data) for a in reply.content[records.ARRAYS].values())

    def claimed(self, reply: Message) -> str:
        patch = reply.content.get(records.PATCH)
        return str(patch.get("adapter-sha256", "")) if patch is not None else ""


class SeedPoolZO(ZoedgeStrategy):
    """Seed-pool ZO (FedKSeed) over the bundle's pool of k seeds."""

    mode = "seed-pool"

    def __init__(self, bundle: Bundle, out: Path, k: int, roles: list[str] | None = None, **fedavg_args) -> None:
        super().__init__(bundle, out, roles, **fedavg_args)
        self.k = k

    def initial_arrays(self) -> ArrayRecord:
        """Round 0: no coefficients and no head start (the bundle itself), written at OUT/round-0/global."""
        c = np.zeros(self.k, np.float32)
        doc = records.write_seed_pool_patch(self.round_dir(0) / "global", self.bundle, c, {}, self.roles,
                                            kind="global", version=0)
        self.digest = doc.adapter_sha256
        return records.seed_pool_record(c, {})

    def instruction(self, config: ConfigRecord) -> ConfigRecord:
        cfg = super().instruction(config)
        cfg["seed-pool-id"] = seedpool.pool_id(self.bundle.manifest)
        cfg["seed-pool-k"] = self.k
        return cfg

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, metrics = self.accepted(server_round, replies)
        rdir = self.round_dir(server_round)
        dirs, docs, weights, devices = [], [], [], []
        for reply in ok:
            node = reply.metadata.src_node_id
            where = f"round {server_round}, node {node}"
            try:
                c, start = records.read_seed_pool(reply.content[records.ARRAYS], self.bundle, self.k, where)
                doc = records.write_seed_pool_patch(rdir / f"node-{node}", self.bundle, c, start, self.roles,
                                                    examples=int(self.weight(reply)))
                if doc.adapter_sha256 != self.claimed(reply):
                    raise ZoedgeError(f"{where}: the coefficients rebuild to {doc.adapter_sha256[:12]} here, the "
                                      f"device says {self.claimed(reply)[:12]}")
            except ZoedgeError as e:
                log(WARNING, "seed-pool: reply left out: %s", e)
                continue
            dirs.append(rdir / f"node-{node}")
            docs.append(doc)
            weights.append(self.weight(reply))
            devices.append({"node_id": node, "examples": weights[-1], "adapter_sha256": doc.adapter_sha256,
                            "update_bytes": self.nbytes(reply)})
        if not docs:
            return None, metrics
        initial = self.bundle.initial_trainables()
        tensors, start, c, _ = seedpool.average(self.bundle.manifest, initial, dirs, docs, weights)
        doc = records.write_seed_pool_patch(rdir / "global", self.bundle, c, start, self.roles, kind="global",
                                            version=server_round, examples=int(sum(weights)),
                                            parents=[f"node-{d['node_id']}" for d in devices])
        if doc.adapter_sha256 != tensor_digest(tensors):
            raise ZoedgeError(f"round {server_round}: the global's rebuild differs from seedpool.average's tensors")
        self.digest = doc.adapter_sha256
        write_json_atomic(rdir / "round.json", {"round": server_round, "mode": self.mode, "devices": devices,
                                                "adapter_sha256": doc.adapter_sha256,
                                                "nonzero_coefficients": int(np.count_nonzero(c))})
        log(INFO, "seed-pool: round %d global %s from %d devices (%d nonzero coefficients)", server_round,
            doc.adapter_sha256[:12], len(devices), int(np.count_nonzero(c)))
        return records.seed_pool_record(c, start), metrics


class AdapterFedAvg(ZoedgeStrategy):
    """FedAvg of the devices' adapter tensors (every trainable of the bundle)."""

    mode = "fedavg"

    def initial_arrays(self) -> ArrayRecord:
        tensors = self.bundle.initial_trainables()
        doc = records.write_adapter_patch(self.round_dir(0) / "global", self.bundle, tensors, version=0)
        self.digest = doc.adapter_sha256
        return records.tensors_record(tensors)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, metrics = self.accepted(server_round, replies)
        tensor_sets, weights, devices = [], [], []
        for reply in ok:
            node = reply.metadata.src_node_id
            where = f"round {server_round}, node {node}"
            try:
                tensors = records.read_tensors(reply.content[records.ARRAYS], self.bundle, where)
                if tensor_digest(tensors) != self.claimed(reply):
                    raise ZoedgeError(f"{where}: the tensors are not those of the device's adapter-sha256")
            except ZoedgeError as e:
                log(WARNING, "fedavg: reply left out: %s", e)
                continue
            tensor_sets.append(tensors)
            weights.append(self.weight(reply))
            devices.append({"node_id": node, "examples": weights[-1], "adapter_sha256": tensor_digest(tensors),
                            "update_bytes": self.nbytes(reply)})
        if not tensor_sets:
            return None, metrics
        averaged = fedavg(tensor_sets, weights)
        rdir = self.round_dir(server_round)
        doc = records.write_adapter_patch(rdir / "global", self.bundle, averaged, version=server_round,
                                          examples=int(sum(weights)),
                                          parents=[f"node-{d['node_id']}" for d in devices])
        self.digest = doc.adapter_sha256
        write_json_atomic(rdir / "round.json", {"round": server_round, "mode": self.mode, "devices": devices,
                                                "adapter_sha256": doc.adapter_sha256})
        log(INFO, "fedavg: round %d global %s from %d devices", server_round, doc.adapter_sha256[:12],
            len(devices))
        return records.tensors_record(averaged), metrics
