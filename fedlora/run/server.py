"""The server side of a run: the round loop that drives a strategy, evaluates and reports.

The loop, in this order (the same in simulation and deployment):
  0. wait until all ``clients`` nodes are connected (Flower registers them over the first
     seconds), ask each for its partition id and label histogram (``query.describe``; under
     DP, in either mode, a client sends no histogram and none is computed for it: the
     label-correlated participation models are refused under DP);
  1. the strategy's one-time initialisation (Fed-SB: round-0 gradient upload, counted);
  2. evaluate the initial global model on the held-out test split (round 0);
  3. for each round: ``configure_train`` (sampling: possibly nobody, under a participation
     model) -> clients train -> ``aggregate_train`` (called in every round, so FedAU's
     counters advance in a round without participants too); the bytes of every message are
     measured; every ``eval_every`` rounds (and the last) the global model (with the
     strategy's base-weight delta: FedEx-LoRA) is evaluated on the server (with
     ``client_ranks``, also the model a client of each rank holds after its download, in the
     row's ``tiers``) and a row is appended to ``results.jsonl``; every ``checkpoint_every`` rounds (after round 0, and the
     last) ``checkpoint.pt`` is written (``fedlora.run.checkpoint``); replies that are missing
     after ``round_timeout`` or rejected count as ``clients_failed``, the rejected ones also
     listed with their reasons in the row's ``rejected``;
  4. the participation matrix (rounds x clients) goes to ``participation.csv`` (not under
     client-level DP, whose accounting needs the sample secret, unless
     ``dp.publish_participation``), the final global adapter (and FedEx's base delta) to
     ``final_adapter.pt``.

Under DP nothing computed from the clients' data reaches the results files but through the
noise (docs/privacy.md, "What leaves a client and what is written"): ``partitions.json`` has
no label histograms (nor, at client level, sizes), rows and ``summary.json`` count no
clients (nor, at client level, bytes, which count them too; ``fedlora.report.results``).

A resumed run (``resume``) starts at step 3 after the checkpoint's round, with the nodes made
whole again by the strategy (``FederatedLoRA.nodes_restarted``). So is a SuperNode that
restarts during a run: under a new id (found before each round, step 3) or under the same id
(node authentication; its error reply says ``fedlora.report.comm.STATE_LOST``), its next message
restores what it lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlora.model.adapters import PARTS, same_model_at_rank, state_at_rank
from fedlora.run.checkpoint import (CHECKPOINT, FINAL_ADAPTER, load_checkpoint, rng_states, save_atomic,
                                    set_rng_states)
from fedlora.report.comm import CommLedger, expected_params, message_part
from fedlora.config import (RunConfig, client_config, resolve_noise,
                            scheduled_lr)
from fedlora.core.errors import ConfigError
from fedlora.model.export import export_run
from fedlora.model.pretrained import AdaptedModel, autocast
from fedlora.aggregation.participation import write_participation_csv
from fedlora.report.results import RUN_ERROR, ResultsWriter, build_summary, elapsed, withheld
from fedlora.report.tracking import flat_params, numbers, open_tracker
from fedlora.strategies import get_strategy
from fedlora.strategies.base import RoundReport
from fedlora.strategies.grid import REPLY_TIMEOUT_S, describe_nodes, wait_for_nodes

log = logging.getLogger("fedlora")


class Exchange:
    """Sends messages through the grid and measures every tensor byte that crosses it."""

    def __init__(self, grid, ledger: CommLedger, client_config: dict, one_time_parts,
                 timeout: float = REPLY_TIMEOUT_S):
        self.grid = grid
        self.timeout = timeout
        self.ledger = ledger
        self.client_config = client_config
        self.one_time_parts = one_time_parts

    def __call__(self, server_round: int, messages: list[Message]) -> list[Message]:
        self.ledger.record(server_round, "down", messages, self.one_time_parts)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            if reply.has_error() and reply.metadata.src_node_id not in sent_to.values():
                # The SuperLink answers for a node that stopped (src_node_id 1): name the node.
                log.warning("round %d: node %s did not answer: %s", server_round,
                            sent_to.get(reply.metadata.reply_to_message_id), reply.error.reason)
        self.ledger.record(server_round, "up", replies, self.one_time_parts)
        return replies


def published_partitions(nodes: dict[int, dict], dp) -> list[dict]:
    """``partitions.json``: each partition's id (and rank, with ``client_ranks``) and, without
    DP, its number of examples and label histogram. Under record-level DP n_k stays (it is public there: the accounting
    publishes ``q_k = b / n_k``) and the histogram goes; under client-level DP the size goes
    too, being a statistic of the unit protected, a client's whole data set."""
    published = []
    for info in sorted(nodes.values(), key=lambda i: i["partition_id"]):
        entry = {"partition_id": info["partition_id"]}
        if not dp.client_level:
            entry["num_examples"] = info["num_examples"]
        if not dp.enabled:
            entry["label_histogram"] = info["label_histogram"]
        if "rank" in info:  # client_ranks: the rank it trains at (public: set by the config)
            entry["rank"] = info["rank"]
        published.append(entry)
    return published


def rejoined_nodes(grid, known: set[int], config: dict, clients: int, server_round: int) -> dict[int, int]:
    """Nodes connected under ids not seen before (a SuperNode restarted without node
    authentication gets a new id, and an empty Context.state): new node id -> partition id.
    ``known`` grows by every new id, so each is asked once."""
    new = sorted(set(grid.get_node_ids()) - known)
    if not new:
        return {}
    known.update(new)
    joined = {node: info["partition_id"] for node, info in
              describe_nodes(grid, new, config, clients).items()}
    for node, partition_id in joined.items():
        log.warning("round %d: node %s joined for partition %d: it takes the partition's place "
                    "and gets what the partition's node held", server_round, node, partition_id)
    return joined


@dataclass
class LoopProgress:
    """The round loop's bookkeeping, checkpointed with the strategy: what the next results row
    sums (since ``last_row_round``) and the run's totals for ``summary.json``."""

    last_row_round: int = -1
    trained: int = 0  # clients aggregated since the last row
    failed: int = 0  # clients missing or rejected since the last row
    rejected: list[dict] = field(default_factory=list)  # {round, partition, reason} since then
    train_losses: list[float] = field(default_factory=list)  # per aggregated round since then
    client_processes: dict[int, int] = field(default_factory=dict)  # pid -> model builds seen
    eval_seconds: list[float] = field(default_factory=list)
    failed_total: int = 0
    rounds_not_aggregated: int = 0  # rounds with messages but no aggregation
    resumed_at: list[int] = field(default_factory=list)  # checkpoint rounds resumed after

    def add_round(self, report: RoundReport, sent: int, answered: int, server_round: int = 0,
                  partition_of: dict[int, int] | None = None) -> None:
        """One training round: ``sent`` messages, ``answered`` replies, the strategy's report.
        Declining for lack of DP budget is no failure (neither missing nor rejected)."""
        for client in report.client_reports:
            if "pid" in client and "model-builds" in client:  # what a ClientApp reports
                pid = int(client["pid"])
                self.client_processes[pid] = max(self.client_processes.get(pid, 0),
                                                 int(client["model-builds"]))
        self.add_rejected(server_round, report.rejected, partition_of or {})
        failed = sent - answered + len(report.rejected)
        self.trained += report.clients_trained
        self.failed += failed
        self.failed_total += failed
        if report.arrays is not None:
            if report.train_loss is not None:  # None under DP: no client sends its loss
                self.train_losses.append(float(report.train_loss))
        elif sent:
            self.rounds_not_aggregated += 1

    def add_setup(self, rejected: list[tuple[int, str]], partition_of: dict[int, int]) -> None:
        """The method's set-up round (0): its rejected replies (node id, reason) are failures."""
        self.add_rejected(0, rejected, partition_of)
        self.failed += len(rejected)
        self.failed_total += len(rejected)

    def add_rejected(self, server_round: int, rejected: list[tuple[int, str]],
                     partition_of: dict[int, int]) -> None:
        """Rejected replies' reasons for the next row (partition None: a sender that is no
        node of the run)."""
        entries = [{"round": server_round, "partition": partition_of.get(node), "reason": reason}
                   for node, reason in rejected]
        # replies arrive in any order: rows list them by partition, so a rerun writes the same
        self.rejected += sorted(entries, key=lambda e: (e["partition"] is None,
                                                        e["partition"] or 0, e["reason"]))

    def mean_train_loss(self) -> float | None:
        return sum(self.train_losses) / len(self.train_losses) if self.train_losses else None

    def row_written(self, server_round: int) -> None:
        self.last_row_round, self.trained, self.failed, self.train_losses = server_round, 0, 0, []
        self.rejected = []

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.client_processes = {int(pid): builds for pid, builds in self.client_processes.items()}


def run_server(grid, cfg: RunConfig, out: Path, bundle: AdaptedModel, data,
               resume: bool = False) -> dict:
    """Run all rounds of ``cfg`` on ``grid``; write the run directory; return the summary.

    ``data``: the task's dataset (``cfg.task_spec().dataset()``); its test split is scored
    by the task's evaluator (``fedlora.tasks.Task.evaluator``) into each row's metrics.
    ``resume``: continue the run in ``out`` from ``out/checkpoint.pt`` (``fedlora.run.checkpoint``).
    """
    checkpoint = load_checkpoint(out) if resume else None
    started = time.time() - (checkpoint["wall_s"] if checkpoint else 0.0)
    strategy = get_strategy(cfg.strategy).from_config(cfg, bundle.head_keys)
    config = client_config(cfg, len(data.label_names))
    ledger = CommLedger(lambda key: message_part(key, bundle.head_keys))
    exchange = Exchange(grid, ledger, config, strategy.one_time_parts_down, cfg.round_timeout)
    task = cfg.task_spec()
    writer = ResultsWriter(out, {**cfg.to_dict(), "out": str(out)}, cfg.rounds,
                           resumed_rows=checkpoint["rows"] if checkpoint else None,
                           metrics=task.metrics)

    connected = wait_for_nodes(grid, cfg.clients)
    nodes = describe_nodes(grid, connected, config, cfg.clients)
    held = sorted(info["partition_id"] for info in nodes.values())
    hint = (f"clients={cfg.clients} needs each of 0..{cfg.clients - 1} once: start node i with "
            f"--node-config 'partition-id=i num-partitions={cfg.clients}'")
    if not held or len(set(held)) < len(held):  # deployment: each --node-config says which
        raise RuntimeError(f"the {len(held)} nodes hold partitions {held[:12]}; {hint}")
    if len(held) < cfg.clients:  # nodes that failed to describe themselves are left out
        log.warning("the run goes on without partitions %s (their nodes did not describe "
                    "themselves); %s", sorted(set(range(cfg.clients)) - set(held))[:12], hint)
    partition_of = {node: info["partition_id"] for node, info in nodes.items()}
    known_nodes = set(connected)  # a node left out is asked again only under a new id
    strategy.register_nodes(partition_of, None if cfg.dp.enabled else
                            {info["partition_id"]: info["label_histogram"] for info in nodes.values()},
                            {info["partition_id"]: info["num_examples"] for info in nodes.values()})
    if cfg.client_ranks:  # the rank each client trains at (docs/algorithms.md)
        for info in nodes.values():
            info["rank"] = strategy.client_rank(info["partition_id"])
    writer.write_json("partitions.json", published_partitions(nodes, cfg.dp))

    score = task.evaluator(bundle, data.test, cfg.max_length, cfg.device)
    example_report = task.example_report(bundle.tokenizer, data, cfg.max_length)
    if cfg.dp.enabled:  # counted over the clients' training data without noise
        example_report = {k: v for k, v in example_report.items()
                          if k not in task.training_data_counts}
    for key, count in example_report.items():
        if count:
            log.warning("%s: %d (max_length=%d; prompts lose tokens from the left)", key, count,
                        cfg.max_length)
    progress = LoopProgress()
    if checkpoint:
        strategy.load_state_dict(checkpoint["strategy"])
        strategy.nodes_restarted(partition_of)  # new node ids, empty Context.state
        ledger.load_state_dict(checkpoint["ledger"])
        progress.load_state_dict(checkpoint["progress"])
        progress.resumed_at.append(checkpoint["round"])
        arrays, first_round = ArrayRecord(checkpoint["arrays"]), checkpoint["round"] + 1
        set_rng_states(checkpoint["rng"])
        log.warning("resuming %s after round %d", out, checkpoint["round"])
    else:
        arrays, first_round = strategy.initialize(grid, ArrayRecord(bundle.state(PARTS)), exchange), 1
        progress.add_setup(strategy.setup_rejected, partition_of)  # in round 0's row

    def evaluate_global(arrays: ArrayRecord) -> dict:
        begin = time.time()
        bundle.set_base_delta(strategy.global_base_delta())
        bundle.load(arrays.to_torch_state_dict())
        with autocast(bundle.model):  # bf16 chosen: the evaluation's forward passes too
            metrics = score()
        if cfg.client_ranks:  # what a client of each rank holds after its download
            state = arrays.to_torch_state_dict()
            tiers = {}
            for rank in sorted(set(cfg.client_ranks)):
                if same_model_at_rank(state, rank):  # the very model just scored
                    tiers[str(rank)] = dict(metrics)
                    continue
                bundle.set_rank(rank)
                bundle.load(state_at_rank(state, rank))
                with autocast(bundle.model):
                    tiers[str(rank)] = score()
            bundle.set_rank(cfg.rank)
            bundle.load(state)
            metrics = {**metrics, "tiers": tiers}
        progress.eval_seconds.append(time.time() - begin)
        return metrics

    def add_row(server_round: int, metrics: dict) -> None:
        rounds = range(progress.last_row_round + 1, server_round + 1)
        writer.row(withheld({
            "round": server_round, "strategy": cfg.strategy, **metrics,
            "train_loss": progress.mean_train_loss(),
            "clients_trained": progress.trained, "clients_failed": progress.failed,
            "bytes_up": sum(ledger.round_bytes(r, "up") for r in rounds),
            "bytes_down": sum(ledger.round_bytes(r, "down") for r in rounds),
            "bytes_up_cum": ledger.total("up", server_round),
            "bytes_down_cum": ledger.total("down", server_round),
            "params_up_per_client": ledger.params_up_per_client(server_round),
            "epsilon": strategy.privacy.max_epsilon() if strategy.privacy else None,
            "wall_s": elapsed(started), **strategy.round_metrics(),
            **({"rejected": progress.rejected} if progress.rejected else {})}, cfg.dp))
        if strategy.privacy is not None:  # rewritten every row: an independent recomputation
            writer.write_json("privacy.json", strategy.privacy.report())  # needs only this file
        # tracking=...: the row's numbers and, for a training round, the clients' lr in it
        tracker.log_metrics(server_round, {**numbers(writer.rows[-1]), **(
            {"lr": scheduled_lr(cfg.lr, server_round, cfg.rounds, cfg.lr_schedule)}
            if server_round else {})})
        progress.row_written(server_round)

    def save_checkpoint(server_round: int) -> None:
        if cfg.checkpoint_every and (server_round % cfg.checkpoint_every == 0
                                     or server_round == cfg.rounds):
            save_atomic({"round": server_round, "arrays": arrays.to_torch_state_dict(),
                         "strategy": strategy.state_dict(), "ledger": ledger.state_dict(),
                         "rows": writer.rows, "progress": progress.state_dict(), "rng": rng_states(),
                         "wall_s": elapsed(started), "config": cfg.to_dict()}, out / CHECKPOINT)

    tracker = open_tracker(cfg.tracking, out, checkpoint["round"] if checkpoint else None)
    tracker.log_params(flat_params({**cfg.to_dict(), "out": str(out)}))
    try:
        if not checkpoint:
            add_row(0, evaluate_global(arrays))
            save_checkpoint(0)
        for server_round in range(first_round, cfg.rounds + 1):
            joined = rejoined_nodes(grid, known_nodes, config, cfg.clients, server_round)
            if joined:
                strategy.nodes_restarted(joined)
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(config), grid))
            replies = exchange(server_round, messages) if messages else []
            report = strategy.aggregate_train(server_round, replies)
            if len(replies) < len(messages):
                log.warning("round %d: %d of %d clients sent no reply within round_timeout=%g s",
                            server_round, len(messages) - len(replies), len(messages),
                            cfg.round_timeout)
            progress.add_round(report, len(messages), len(replies), server_round,
                               strategy.partition_of)
            if report.arrays is not None:
                arrays = report.arrays
            if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
                add_row(server_round, evaluate_global(arrays))
            save_checkpoint(server_round)
    finally:  # rows written so far stay on disk whatever happens
        writer.close()
        tracker.close()
        if not cfg.dp.client_level or cfg.dp.publish_participation:  # else the sample is secret
            write_participation_csv(out / "participation.csv", strategy.participation_matrix())

    save_atomic({"adapter": arrays.to_torch_state_dict(),
                 "base_delta": strategy.global_base_delta()}, out / FINAL_ADAPTER)
    export_run(bundle, strategy, arrays.to_torch_state_dict(), out, cfg.export.merge)
    layers = bundle.layer_shapes()
    head_params = sum(int(v.numel()) for k, v in bundle.state(("head",)).items())
    summary = build_summary(cfg, writer.rows, ledger, progress,
                            params_per_client_formula=expected_params(type(strategy), layers,
                                                                      cfg.rank, head_params),
                            adapted_layers=len(layers), head_params=head_params,
                            wall_s=elapsed(started), metrics=task.metrics,
                            examples=example_report, precision=bundle.precision)
    writer.write_json("summary.json", summary)
    return summary


def prepare(cfg: RunConfig):
    """Load and check the data, the partitions and the model in this process (before Ray)."""
    from fedlora.tasks.data import client_partitions
    from fedlora.model.pretrained import build_model

    task = cfg.task_spec()
    data = task.dataset()
    client_partitions(task, cfg.clients, cfg.partition, cfg.seed)
    bundle = build_model(cfg.model_spec(len(data.label_names)), cfg.device)
    # Tokenise here what the clients and the evaluation will: a response that cannot fit
    # max_length is a one-line error now, not a failure in every worker later.
    task.training_examples(bundle.tokenizer, cfg.max_length)
    task.example_report(bundle.tokenizer, data, cfg.max_length)
    smallest = min(min(shape) for shape in bundle.layer_shapes())
    if cfg.rank > smallest:
        raise ConfigError(f"rank={cfg.rank} exceeds the smallest adapted dimension ({smallest}); "
                          f"set rank <= {smallest}")
    if cfg.dp.record_level:  # the clients' Opacus wrapping must not fail in every worker later
        from fedlora.clients.dp import check_opacus_can_wrap

        bundle.set_trainable(get_strategy(cfg.strategy).trained_parts)
        check_opacus_can_wrap(bundle.model, cfg.model)
        bundle.set_trainable(PARTS)
    return data, bundle


def config_from_run_config(run_config: dict) -> tuple[RunConfig, Path]:
    """The RunConfig from Flower's run config (``[tool.flwr.app.config]``, ``--run-config``),
    whose keys are the same as ``python -m fedlora.simulate``'s, nested ones dotted (or nested
    tables, as pyproject.toml holds them). With ``resume=DIR``: DIR's saved config and DIR."""
    from flwr.common.config import flatten_dict, unflatten_dict

    # Flower gives dotted keys or nested tables (pyproject.toml); "" is the key's default
    nested = unflatten_dict({k: None if v == "" else v for k, v in flatten_dict(dict(run_config)).items()})
    resume = nested.pop("resume", None)
    out = nested.pop("out", None) or f"outputs/{time.strftime('%Y-%m-%d_%H-%M-%S')}-deploy"
    cfg = RunConfig.from_dict(nested)
    if resume:  # the killed run's own config, as in ``python -m fedlora.simulate resume=DIR``
        from fedlora.run.cli import resumed_config

        return resumed_config(Path(resume), cfg, given=[]), Path(resume)
    return cfg, Path(out)


# The ServerApp Flower loads from pyproject.toml ([tool.flwr.app.components]), e.g. for `flwr run`.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedlora.run.cli import setup_logging

    cfg, out = config_from_run_config(dict(context.run_config))
    cfg = resolve_noise(cfg, deployment=True)  # null: secret DP noise on real SuperNodes
    setup_logging(out, quiet=not cfg.verbose)  # DIR/run.log, as in a simulation
    if cfg.dp.enabled and cfg.dp.noise == "reproducible":
        log.warning("dp.reproducible_noise=true: the clients seed their DP noise and sampling "
                    "with what this server knows, so it can remove the noise; unsafe outside "
                    "experiments")
    data, bundle = prepare(cfg)
    try:
        run_server(grid, cfg, out, bundle, data, resume=bool(context.run_config.get("resume")))
    except ConfigError as error:  # e.g. a node's policy refuses the run: one line, no traceback
        log.error("%s", error)
        (out / RUN_ERROR).write_text(f"{error}\n")
