"""The server side of a run: the round loop that drives a strategy, evaluates and reports.

The loop, in this order (the same in simulation and deployment):
  0. wait until all ``clients`` nodes are connected (Flower registers them over the first
     seconds), ask each for its partition id and label histogram (``query.describe``);
  1. the strategy's one-time initialisation (Fed-SB: round-0 gradient upload, counted);
  2. evaluate the initial global model on the held-out test split (round 0);
  3. for each round: ``configure_train`` (sampling: possibly nobody, under a participation
     model) -> clients train -> ``aggregate_train`` (called in every round, so FedAU's
     counters advance in a round without participants too); the bytes of every message are
     measured; every ``eval_every`` rounds (and the last) the global model (with the
     strategy's base-weight delta: FedEx-LoRA) is evaluated on the server and a row is
     appended to ``results.jsonl``;
  4. the participation matrix (rounds x clients) goes to ``participation.csv``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import PARTS
from fedlora.comm import CommLedger, expected_params, message_part
from fedlora.config import RunConfig, client_config
from fedlora.data import Batches, client_partitions, load_dataset
from fedlora.errors import ConfigError
from fedlora.models import AdaptedModel, build_model, evaluate
from fedlora.participation import write_participation_csv
from fedlora.results import ResultsWriter, elapsed, package_versions
from fedlora.strategies import get_strategy

log = logging.getLogger("fedlora")

REPLY_TIMEOUT_S = 3600.0


class Exchange:
    """Sends messages through the grid and measures every tensor byte that crosses it."""

    def __init__(self, grid, ledger: CommLedger, client_config: dict, one_time_parts):
        self.grid = grid
        self.ledger = ledger
        self.client_config = client_config
        self.one_time_parts = one_time_parts

    def __call__(self, server_round: int, messages: list[Message]) -> list[Message]:
        self.ledger.record(server_round, "down", messages, self.one_time_parts)
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        self.ledger.record(server_round, "up", replies, self.one_time_parts)
        return replies


def wait_for_nodes(grid, count: int, timeout_s: float = 300.0) -> list[int]:
    """Block until ``count`` nodes are connected, so round 1 samples from all of them."""
    deadline = time.time() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} clients connected in {timeout_s:.0f} s")
        time.sleep(0.2)


def describe_nodes(grid, nodes: list[int], config: dict) -> dict[int, dict]:
    """Each node's partition id, number of examples and label histogram."""
    messages = [Message(content=RecordDict({"config": ConfigRecord(config)}),
                        message_type="query.describe", dst_node_id=node) for node in nodes]
    info = {}
    for reply in grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        metrics = reply.content["metrics"]
        info[reply.metadata.src_node_id] = {"partition_id": int(metrics["partition-id"]),
                                            "num_examples": int(metrics["num-examples"]),
                                            "label_histogram": list(metrics["label-histogram"])}
    return info


def run_server(grid, cfg: RunConfig, out: Path, bundle: AdaptedModel, data) -> dict:
    """Run all rounds of ``cfg`` on ``grid``; write the run directory; return the summary."""
    started = time.time()
    strategy = get_strategy(cfg.strategy)(cfg, bundle.head_keys)
    config = client_config(cfg, data.num_labels)
    ledger = CommLedger(lambda key: message_part(key, bundle.head_keys))
    exchange = Exchange(grid, ledger, config, strategy.one_time_parts_down)
    writer = ResultsWriter(out, {**cfg.to_dict(), "out": str(out)}, cfg.rounds)

    nodes = describe_nodes(grid, wait_for_nodes(grid, cfg.clients), config)
    strategy.register_nodes({node: info["partition_id"] for node, info in nodes.items()},
                            {info["partition_id"]: info["label_histogram"] for info in nodes.values()})
    writer.write_json("partitions.json", sorted(nodes.values(), key=lambda i: i["partition_id"]))

    test = Batches(bundle.tokenizer, data.test.texts, data.test.labels, cfg.max_length)
    arrays = strategy.initialize(grid, ArrayRecord(bundle.state(PARTS)), exchange)

    eval_seconds: list[float] = []

    def evaluate_global(arrays: ArrayRecord) -> dict:
        begin = time.time()
        bundle.set_base_delta(strategy.global_base_delta())
        bundle.load(arrays.to_torch_state_dict())
        metrics = evaluate(bundle, test, device=cfg.device)
        eval_seconds.append(time.time() - begin)
        return metrics

    client_processes: dict[int, int] = {}  # pid -> model builds seen in that process
    last_row_round, trained, failed, train_losses = -1, 0, 0, []

    def add_row(server_round: int, metrics: dict) -> None:
        nonlocal last_row_round, trained, failed, train_losses
        rounds = range(last_row_round + 1, server_round + 1)
        writer.row({
            "round": server_round, "strategy": cfg.strategy, **metrics,
            "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
            "clients_trained": trained, "clients_failed": failed,
            "bytes_up": sum(ledger.round_bytes(r, "up") for r in rounds),
            "bytes_down": sum(ledger.round_bytes(r, "down") for r in rounds),
            "bytes_up_cum": ledger.total("up", server_round),
            "bytes_down_cum": ledger.total("down", server_round),
            "params_up_per_client": ledger.params_up_per_client(server_round),
            "epsilon": strategy.privacy.max_epsilon() if strategy.privacy else None,
            "wall_s": elapsed(started)})
        if strategy.privacy is not None:  # rewritten every row: an independent recomputation
            writer.write_json("privacy.json", strategy.privacy.report())  # needs only this file
        last_row_round, trained, failed, train_losses = server_round, 0, 0, []

    try:
        add_row(0, evaluate_global(arrays))
        for server_round in range(1, cfg.rounds + 1):
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(config), grid))
            replies = exchange(server_round, messages) if messages else []
            new_arrays, metrics = strategy.aggregate_train(server_round, replies)
            for report in strategy.client_reports:
                pid = int(report["pid"])
                client_processes[pid] = max(client_processes.get(pid, 0), int(report["model-builds"]))
            accepted = int(metrics["clients_trained"]) if metrics else 0
            trained += accepted
            failed += len(messages) - accepted - strategy.declined_now  # declining is no failure
            if metrics:
                train_losses.append(float(metrics["train_loss"]))
            if new_arrays is not None:
                arrays = new_arrays
            if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
                add_row(server_round, evaluate_global(arrays))
    finally:  # rows written so far stay on disk whatever happens
        writer.close()
        write_participation_csv(out / "participation.csv", strategy.participation_matrix())

    layers = [tuple(bundle.model.get_submodule(name).base.weight.shape) for name in bundle.adapted]
    head_params = sum(int(v.numel()) for k, v in bundle.state(("head",)).items())
    rows = writer.rows
    summary = {
        "strategy": cfg.strategy, "rounds": cfg.rounds, "seed": cfg.seed,
        "final_accuracy": rows[-1]["accuracy"], "final_loss": rows[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in rows), "initial_accuracy": rows[0]["accuracy"],
        "bytes_up_total": ledger.total("up"), "bytes_down_total": ledger.total("down"),
        "one_time_bytes_up": ledger.one_time["up"], "one_time_bytes_down": ledger.one_time["down"],
        "wire_bytes_up_total": ledger.wire["up"], "wire_bytes_down_total": ledger.wire["down"],
        "params_up_per_client": rows[-1]["params_up_per_client"],
        "epsilon": rows[-1]["epsilon"],  # DP: the most any client spent (privacy.json: each)
        "params_per_client_formula": expected_params(type(strategy), layers, cfg.rank,
                                                     head_params),
        "adapted_layers": len(layers), "head_params": head_params,
        "client_processes": {str(pid): builds for pid, builds in sorted(client_processes.items())},
        "eval_s_total": round(sum(eval_seconds), 3), "evaluations": len(eval_seconds),
        "wall_s": elapsed(started), "config": cfg.to_dict(), "versions": package_versions(),
    }
    writer.write_json("summary.json", summary)
    return summary


def prepare(cfg: RunConfig):
    """Load and check the data, the partitions and the model in this process (before Ray)."""
    from fedlora.data import client_partitions, load_dataset
    from fedlora.models import build_model

    data = load_dataset(cfg.data)
    if data.num_labels < 2:
        raise ConfigError(f"the data has {data.num_labels} label value(s); a classification task "
                          "needs at least 2 (check data.label_field)")
    client_partitions(cfg.data, cfg.clients, cfg.partition, cfg.partition_alpha, cfg.seed,
                      cfg.partition_labels_per_client)
    bundle = build_model(cfg.model_spec(data.num_labels), cfg.device)
    smallest = min(min(bundle.model.get_submodule(n).base.weight.shape) for n in bundle.adapted)
    if cfg.rank > smallest:
        raise ConfigError(f"rank={cfg.rank} exceeds the smallest adapted dimension ({smallest}); "
                          f"set rank <= {smallest}")
    if cfg.dp.enabled:  # the clients' Opacus wrapping must not fail in every worker later
        from fedlora.clients.dp import check_opacus_can_wrap

        bundle.set_trainable(get_strategy(cfg.strategy).trained_parts)
        check_opacus_can_wrap(bundle.model, cfg.model)
        bundle.set_trainable(PARTS)
    return data, bundle


def config_from_run_config(run_config: dict) -> tuple[RunConfig, Path]:
    """The RunConfig from Flower's run config (``[tool.flwr.app.config]``, ``--run-config``),
    whose keys are the same as ``python -m fedlora.simulate``'s, nested ones dotted."""
    nested: dict = {}
    for key, value in run_config.items():
        node = nested
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = None if value == "" else value
    out = nested.pop("out", None) or f"outputs/{time.strftime('%Y-%m-%d_%H-%M-%S')}-deploy"
    return RunConfig.from_dict(nested), Path(out)


# The ServerApp Flower loads from pyproject.toml ([tool.flwr.app.components]), e.g. for `flwr run`.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = config_from_run_config(dict(context.run_config))
    data, bundle = prepare(cfg)
    run_server(grid, cfg, out, bundle, data)
