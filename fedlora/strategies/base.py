"""What every fedlora strategy shares: a thin coordinator of Flower's ``Strategy`` hooks.

A strategy holds the global adapter state as the ``ArrayRecord`` Flower passes between
``configure_train`` and ``aggregate_train``; a subclass says which parts its clients train
(``trained_parts``, or per round ``trained_parts_in``), which they keep between rounds
(``kept_parts``, ``additive_parts``: the record of who holds what is the coordinator's,
``fedlora.strategies.holdings``; the method moves a part's version, ``holdings.advance``, and
may say how a client catches up on it, ``catch_up``, or gets it back, ``restore``), what else
it sends down (``config_down``), how it aggregates (``aggregate``, calling
``fedlora.aggregation.maths``), and its per-matrix communication formula.
The base only orders the round; each job is a part with one purpose, composed here once so
that it works with every method:

* ``ClientSampler`` (``fedlora.aggregation.participation``): uniform sampling or a participation model;
* ``ClientWeighting`` (``fedlora.aggregation.participation``): ``c_k`` by samples, uniform or FedAU;
* ``ReplySchema`` (``fedlora.strategies.replies``): why a reply must be rejected (pure checks);
* ``NodeBook``: each node's partition and its size as described, who is being restored, which
  partitions trained;
* ``HeldParts`` (``fedlora.strategies.holdings``): which version of each kept part every client
  holds, keyed by partition id (what it was sent this round is committed on a valid reply);
* ``ServerPrivacy`` (``fedlora.privacy.accounting``): the record-level DP ledger around the round's
  messages; ``ClientLevelDP`` (``fedlora.privacy.client_level``): client-level DP on the round's updates.

One training round, in this order (``configure_train`` then ``aggregate_train``):
  1. sample this round's clients among those still within their privacy budget: exactly
     ``clients_per_round`` with the run's seeded RNG (``participation=uniform``), or those a
     participation model marks active (bernoulli, markov, cyclic);
  2. send each the tensors it needs (``payload_down``: the parts it trains that it does not
     keep, and every kept part it holds an old version of, through ``catch_up``; with what it
     held, ``restore``, on top for a node that lost its Context.state) and the client config:
     the round's learning rate, the parts it trains (``trained_parts_in``), ``config_down``
     and, under DP, the server's copy of its accountant; note what it will hold
     (``HeldParts.send``);
  3. clients train only those parts and reply with them (``fedlora.clients``); under DP each
     reports its accountant, taken into the ledger first, and one out of budget declines
     instead (never sampled again);
  4. reject replies that fail the reply schema (``fedlora.strategies.replies``): errors, keys,
     shapes or dtypes other than those sent, non-finite values, ``num-examples`` not a positive
     integer up to the node's described size, an update further than ``max_update_norm`` from
     the global state, a malformed DP accountant (logged with the reason and reported in
     ``RoundReport.rejected``; the global state never sees them; a node that says it lost its
     state is restored next time); a round with fewer than ``min_clients`` valid replies is
     not aggregated at all (never partially);
  5. book the valid replies: those nodes are whole again and their partitions have trained;
  6. weight the valid replies: ``c_k = n_k / sum n`` (samples), ``1/K`` (uniform) or
     ``omega_k / N`` (FedAU, whose estimator steps every round, also a round without replies);
  7. commit what each client was sent (``HeldParts.accept``; ``reject`` for the others);
  8. under client-level DP (``dp.mode=client``, ``fedlora.privacy.client_level.ClientLevelDP``) the valid
     updates become one pseudo-update, the previous value plus the noised mean of their clipped
     deltas, with weight 1 (clients were Poisson-sampled in step 1);
  9. aggregate on deltas, ``x <- x + eta * sum_k c_k (x_k - x)`` (``aggregate``, with the
     previous global value as one more weighted "client" where that rule needs it), and report
     the round (``RoundReport``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedlora.model.adapters import factor_key, layer_names, part_of, state_at_rank
from fedlora.privacy.client_level import ClientLevelDP, client_level_dp
from fedlora.aggregation.maths import (sample_weights, server_step_weights, single_threaded,
                                       weighted_mean_states)
from fedlora.report.comm import RESTORE, STATE_LOST
from fedlora.config import round_lr
from fedlora.aggregation.participation import ClientSampler, ClientWeighting, FedAUWeights
from fedlora.privacy.accounting import PrivacyLedger, ServerPrivacy
from fedlora.strategies.holdings import HeldParts
from fedlora.strategies.replies import ReplySchema, TensorSpec, tensor_spec

log = logging.getLogger("fedlora")

@dataclass
class RoundReport:
    """One round's result. Unpacks as Flower's ``(ArrayRecord | None, MetricRecord | None)``:
    ``arrays`` is None when the round was not aggregated (the global state stays as it was)."""

    arrays: ArrayRecord | None = None
    train_loss: float | None = None  # the sample-weighted mean of the valid replies' loss
    # (None under DP: a DP client reports no un-noised loss)
    clients_trained: int = 0  # valid replies aggregated
    client_weight_sum: float = 0.0  # sum of c_k (1 but for FedAU)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    client_reports: list[dict] = field(default_factory=list)  # metrics of each valid reply
    declined: list[int] = field(default_factory=list)  # partitions out of DP budget now

    @property
    def metrics(self) -> MetricRecord | None:
        if self.arrays is None:
            return None
        loss = {} if self.train_loss is None else {"train_loss": self.train_loss}
        return MetricRecord({**loss, "clients_trained": self.clients_trained,
                             "client_weight_sum": self.client_weight_sum})

    # Flower's pair: ``arrays, metrics = report``, ``report[0]``, ``len(report) == 2``.
    def __iter__(self) -> Iterator:
        return iter((self.arrays, self.metrics))

    def __getitem__(self, index: int):
        return (self.arrays, self.metrics)[index]

    def __len__(self) -> int:
        return 2


@dataclass
class NodeBook:
    """Who is who among the nodes: each node's partition, each partition's number of examples
    as its node described it (the most a reply may claim), the nodes that lost their
    Context.state and are being restored, and the partitions whose node has replied validly.
    (What each client holds is ``HeldParts``'s, keyed by partition.)"""

    partition_of: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    examples: dict[int, int] = field(default_factory=dict)  # partition id -> described size
    restoring: set[int] = field(default_factory=set)
    partitions_trained: set[int] = field(default_factory=set)

    def node_of(self, partition_ids: list[int]) -> list[int]:
        by_partition = {pid: node for node, pid in self.partition_of.items()}
        return [by_partition[p] for p in partition_ids]

    def restarted(self, partition_of: dict[int, int]) -> None:
        """Nodes back with an empty Context.state (new node id -> partition id) take their
        partitions' places and are restored."""
        node_of = {pid: node for node, pid in partition_of.items()}
        replaced = {old for old, pid in self.partition_of.items() if pid in node_of}
        self.partition_of = {node: pid for node, pid in self.partition_of.items()
                             if pid not in node_of} | dict(partition_of)
        self.restoring = (self.restoring - replaced) | set(partition_of)

    def state_dict(self) -> dict:
        return {"partition_of": sorted(self.partition_of.items()),
                "partitions_trained": sorted(self.partitions_trained)}

    def load_state_dict(self, state: dict) -> None:
        self.partition_of = {int(node): int(pid) for node, pid in state["partition_of"]}
        self.partitions_trained = set(state["partitions_trained"])


class FederatedLoRA(Strategy):
    name: str = ""
    latent: bool = False  # LoRA-SB's R between A and B
    exact: bool = False  # the paper's promise: the global update is E_w of the clients' updates
    trained_parts: tuple[str, ...] = ("A", "B", "head")
    one_time_parts_down: frozenset[str] = frozenset()  # bytes of these parts count as one-time
    kept_parts: frozenset[str] = frozenset()  # parts a client keeps between rounds (Context.state)
    # kept quantities a client sums, not replaced (FedEx-LoRA's base delta): ``HeldParts.additive``
    additive_parts: frozenset[str] = frozenset()
    keeps_node_state = property(lambda self: bool(self.kept_parts))  # FedEx: also its base delta
    seeded_parts: frozenset[str] = frozenset()  # parts a client rebuilds from the shared init seed
    moves_base_weights: bool = False  # the method adds to W0 (``global_base_delta``)
    # Clients of different ranks (``client_ranks``, docs/algorithms.md). None: the method refuses
    # them. "pad": the global factors have the largest rank; a client is sent (and keeps) their
    # first r_k components, and its reply is zero-padded to the largest rank before
    # ``aggregate``. "stack": the same downloads, but ``aggregate`` takes each reply at its
    # own rank.
    rank_rule: str | None = None
    # Defaults for keys left null in the config: rank, LoRA scale alpha/rank, client lr.
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-3}

    @classmethod
    def config_problem(cls, cfg) -> str | None:
        """A setting the method cannot run with, as a one-line ``ConfigError`` message
        (naming the key, the value and the fix); None: none."""
        return None

    @classmethod
    def setup_examples_per_client(cls, cfg) -> int:
        """Examples each client releases in the method's one-time set-up round (``initialize``),
        which DP must plan for besides training; 0: the method has no such release."""
        return 0

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        """Parameters one client uploads per round for one adapted m x n matrix."""
        raise NotImplementedError

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        """Parameters one client downloads per round for one adapted m x n matrix."""
        raise NotImplementedError

    @classmethod
    def params_in_round(cls, m: int, n: int, rank: int, server_round: int) -> tuple[int, int]:
        """(up, down) parameters for one adapted m x n matrix in training round ``server_round``
        of the steady state; a method whose messages alternate by round overrides it."""
        return cls.params_up(m, n, rank), cls.params_down(m, n, rank)

    def __init__(self, cfg, head_keys: frozenset[str]):
        self.cfg = cfg
        self.settings = cfg.settings  # the method's own ``<name>.*`` section (None: none)
        self.head_keys = head_keys
        self.sampler = ClientSampler(cfg.participation, cfg.clients, cfg.clients_per_round, cfg.seed)
        self.weighting = ClientWeighting(cfg.weighting, cfg.clients, cfg.fedau.cutoff)
        self.nodes = NodeBook()
        self.holdings = HeldParts(kept=frozenset(self.kept_parts),
                                  additive=frozenset(self.additive_parts),
                                  seeded=frozenset(self.seeded_parts))
        self.dp = (ServerPrivacy(cfg.dp.epsilon, cfg.dp.accountant, noise=cfg.dp.noise)
                   if cfg.dp.record_level else None)
        # Client-level DP: the server clips and noises the round's updates (step 6a).
        self.client_dp = (client_level_dp(cfg, setup_releases=int(self.setup_examples_per_client(cfg) > 0))
                          if cfg.dp.client_level else None)
        if self.client_dp is not None:
            self.sampler.use_rate(self.client_dp.sample_rate)
        self.server_round = 0
        self.current: dict[str, torch.Tensor] = {}  # global state sent this round
        self.setup_rejected: list[tuple[int, str]] = []  # (node id, reason) in ``initialize``
        self.previous_in_updates = False  # ``aggregate``'s last update is the previous state

    # Read-only views of the parts, for reports and tests.

    @property
    def partition_of(self) -> dict[int, int]:
        return self.nodes.partition_of

    @property
    def restoring(self) -> set[int]:
        return self.nodes.restoring

    @property
    def fedau(self) -> FedAUWeights | None:
        return self.weighting.fedau

    @property
    def privacy(self) -> PrivacyLedger | ClientLevelDP | None:
        """The DP accounting (None without DP): record-level, each client's accountant and who
        declined; client-level, the run's. Both give ``max_epsilon()`` and ``report()``."""
        return self.dp.ledger if self.dp is not None else self.client_dp

    # -- hooks a method overrides -----------------------------------------------------------

    def trained_parts_in(self, server_round: int) -> tuple[str, ...]:
        """The parts clients train (and send back) in ``server_round``: ``trained_parts`` in
        every round unless a method alternates (e.g. B rounds and A rounds)."""
        return self.trained_parts

    def payload_down(self, node_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client receives: the parts it trains this round that it does not keep (their
        starting point), and each kept part it holds an old version of (``catch_up``)."""
        partition = self.nodes.partition_of[node_id]
        trained = self.trained_parts_in(self.server_round)
        payload = state_at_rank({k: v for k, v in state.items()
                                 if self.part(k) in trained and self.part(k) not in self.kept_parts},
                                self.client_rank(partition))
        for part in self.holdings.stale(partition, self.client_rank(partition)):
            payload.update(self.catch_up(part, partition, state))
        return payload

    def catch_up(self, part: str, partition: int, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """The tensors that bring ``partition`` from the version of kept ``part`` it holds
        (``self.holdings``) to the current one: by default the current value. A method whose
        kept quantity is a sum (``additive_parts``) sends the updates it missed."""
        return state_at_rank({k: v for k, v in state.items() if self.part(k) == part},
                             self.client_rank(partition))

    def restore(self, part: str, partition: int, state: dict[str, torch.Tensor],
                payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a client that lost its Context.state held of kept ``part``, on top of
        ``payload`` (which already carries the part where it was stale), and the config values
        that go with it: by default the current value (what it held, being up to date)."""
        return {k: v for k, v in self.catch_up(part, partition, state).items() if k not in payload}, {}

    def restore_down(self, node_id: int, state: dict[str, torch.Tensor],
                     payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a node that lost its Context.state needs on top of ``payload`` to train exactly
        as if it had kept it (``restore`` of each kept part), and the config that goes with it."""
        partition = self.nodes.partition_of[node_id]
        tensors, config = {}, {}
        for part in sorted(self.holdings.parts):
            part_tensors, part_config = self.restore(part, partition, state, payload)
            tensors.update(part_tensors)
            config.update(part_config)
        return tensors, config

    def config_down(self, node_id: int) -> dict:
        """Extra ConfigRecord values for one node (by default none)."""
        return {}

    def client_rank(self, partition: int) -> int:
        """The adapter rank ``partition`` trains at: ``client_ranks[partition % len]`` (or
        ``rank``), until the client reports another (``next-rank``, rank self-pruning)."""
        if partition in self.holdings.ranks:
            return self.holdings.ranks[partition]
        ranks = self.cfg.client_ranks
        return ranks[partition % len(ranks)] if ranks else self.cfg.rank

    def round_metrics(self) -> dict:
        """Values of the method's own for the next results row (by default none)."""
        return {}

    def aggregate(self, state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                  weights: list[float]) -> dict[str, torch.Tensor]:
        """The new global state: ``sum_j weights[j] * updates[j]`` for each trained tensor.

        ``updates`` are the clients' trained tensors, followed by the previous global values
        when the delta rule needs them (``fedlora.aggregation.maths.server_step_weights``)."""
        return {**state, **weighted_mean_states(updates, weights)}

    def global_base_delta(self) -> dict[str, torch.Tensor] | None:
        """What the server's model adds to each adapted layer's pretrained base weight
        (``{layer: m x n}``); None: the base weights never change (all methods but FedEx)."""
        return None

    def export_factors(self, state: dict[str, torch.Tensor]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each adapted layer's plain-LoRA factors ``{layer: (B, A)}`` whose ``s B A`` (same
        scale s = alpha / rank) is the layer's update in the global ``state``: what a peft
        adapter holds (``fedlora.model.export``). By default the state's own B and A."""
        return {layer: (state[factor_key(layer, "B")], state[factor_key(layer, "A")])
                for layer in layer_names(state)}

    def initialize(self, grid, arrays: ArrayRecord, exchange) -> ArrayRecord:
        """One-time setup before round 1 (e.g. Fed-SB's gradient initialisation)."""
        return arrays

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a restart needs, as plain Python values (JSON-able) in the base class;
        subclasses may add tensors (then save with ``torch.save``)."""
        state = {**self.nodes.state_dict(), "sampler": self.sampler.state_dict(),
                 "weighting": self.weighting.state_dict(), "holdings": self.holdings.state_dict()}
        if self.dp is not None:
            state["privacy"] = self.dp.state_dict()
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.nodes.load_state_dict(state)
        self.holdings.load_state_dict(state["holdings"])
        self.sampler.load_state_dict(state["sampler"])
        self.weighting.load_state_dict(state["weighting"])
        if self.dp is not None:
            self.dp.load_state_dict(state["privacy"])
        if self.client_dp is not None:
            self.client_dp.load_state_dict(state["client_dp"])

    # -- nodes ---------------------------------------------------------------------------------

    def part(self, key: str) -> str | None:
        return part_of(key, self.head_keys)

    def register_nodes(self, partition_of: dict[int, int],
                       label_histograms: dict[int, list[int]] | None = None,
                       examples: dict[int, int] | None = None) -> None:
        """The connected nodes (node id -> partition id), for the participation models each
        partition's label histogram (partition id -> counts per label) and, for the reply
        check, each partition's number of examples as described (partition id -> count)."""
        self.nodes.partition_of = dict(partition_of)
        self.nodes.examples = dict(examples or {})
        self.sampler.use_label_histograms(label_histograms)

    def nodes_restarted(self, partition_of: dict[int, int]) -> None:
        """Nodes that came back with an empty Context.state, under new ids (``partition_of``,
        new node id -> partition id): all of them after a server restart
        (``load_state_dict``), or SuperNodes that rejoined during a run. The record of who
        holds what is keyed by partition and stays as it is, so messages and byte counts stay
        those of an uninterrupted run; each node's next message also carries a ``RESTORE``
        record with what it lost (``restore``; counted apart, ``fedlora.report.comm.CommLedger``)."""
        self.nodes.restarted(partition_of)

    def sample(self, server_round: int) -> list[int]:
        """This round's node ids in partition order (step 1), reproducible from the seed."""
        eligible = sorted(self.nodes.partition_of.values())
        if self.dp is not None:  # clients out of privacy budget are never sampled again
            eligible = self.dp.eligible(eligible)
        return self.nodes.node_of(self.sampler.sample(server_round, eligible))

    def participation_matrix(self) -> np.ndarray:
        """Boolean [rounds, clients]: which partitions were sampled in rounds 1, 2, ..."""
        return self.sampler.participation_matrix()

    # -- the round -----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        """Steps 1 and 2: one train message per sampled node."""
        self.server_round = server_round
        self.current = arrays.to_torch_state_dict()
        self.holdings.pending = {}
        trained = self.trained_parts_in(server_round)
        messages = []
        for node_id in self.sample(server_round):
            partition_id = self.nodes.partition_of[node_id]
            restoring = node_id in self.nodes.restoring
            payload = self.payload_down(node_id, self.current)
            restore, restore_config = ({}, {}) if not restoring else \
                self.restore_down(node_id, self.current, payload)
            node_config = ConfigRecord({**config, "server-round": server_round,
                                        "lr": round_lr(self.cfg, server_round),
                                        "head-lr": round_lr(self.cfg, server_round,
                                                            self.cfg.head_lr or self.cfg.lr),
                                        "trained-parts": ",".join(trained),
                                        "keep-parts": ",".join(sorted(self.kept_parts)),
                                        "seeded-parts": ",".join(sorted(self.seeded_parts)),
                                        # a node that trained before must still hold its state
                                        "expect-state": int(self.keeps_node_state and not restoring
                                                            and partition_id in self.nodes.partitions_trained),
                                        # its own rank (client_ranks, or pruned since)
                                        **({"client-rank": self.client_rank(partition_id)}
                                           if self.cfg.client_ranks or partition_id in
                                           self.holdings.ranks else {}),
                                        **self.config_down(node_id), **restore_config,
                                        **(self.dp.outgoing(partition_id) if self.dp else {})})
            self.holdings.send(partition_id, self.client_rank(partition_id))
            content = RecordDict({"arrays": ArrayRecord(payload), "config": node_config})
            if restore:
                content[RESTORE] = ArrayRecord(restore)
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Steps 3 to 8: validate, weight and aggregate one round's replies. Call it every
        round, with no replies too; ``arrays`` is None if none is valid (the global state stays
        as it was)."""
        self.server_round = server_round
        report = RoundReport()
        replies = self.record_privacy(replies, report.declined)
        expected = {k: v for k, v in self.current.items()
                    if self.part(k) in self.trained_parts_in(server_round)}
        schemas: dict[int, ReplySchema] = {}  # one per client rank: what it was sent
        valid = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            partition = self.nodes.partition_of.get(node_id)
            rank = self.cfg.rank if partition is None else self.client_rank(partition)
            if rank not in schemas:
                sent = state_at_rank(expected, rank)
                schemas[rank] = ReplySchema(tensor_spec(sent), self.nodes.examples,
                                            accountant=self.dp is not None, reference=sent,
                                            max_update_norm=self.cfg.max_update_norm)
            reason = (schemas[rank].problem(reply, self.nodes.partition_of)
                      or next_rank_problem(reply, rank))
            if reason is None:
                valid.append(reply)
                continue
            report.rejected.append((node_id, reason))
            log.warning("round %d: rejected the update of node %s: %s", server_round, node_id, reason)
            if STATE_LOST in reason:  # restarted under the same id: restore it next time
                self.nodes.restoring.add(node_id)
        # Replies arrive in any order; aggregating in partition order makes the sums exact
        # from run to run.
        valid.sort(key=lambda r: self.nodes.partition_of[r.metadata.src_node_id])
        if 0 < len(valid) < self.cfg.min_clients:
            log.warning("round %d: only %d valid replies, fewer than min_clients=%d: the round "
                        "is not aggregated (the global state stays as it was)", server_round,
                        len(valid), self.cfg.min_clients)
            valid = []
        nodes = [r.metadata.src_node_id for r in valid]
        partitions = [self.nodes.partition_of[n] for n in nodes]
        self.nodes.restoring -= set(nodes)
        self.nodes.partitions_trained |= set(partitions)
        report.client_reports = [dict(r.content["metrics"]) for r in valid]
        num_examples = [int(r.content["metrics"]["num-examples"]) for r in valid]
        coefficients = self.weighting.coefficients(partitions, num_examples)
        for partition in partitions:
            self.holdings.accept(partition)
        self.holdings.end_round()  # the other messaged clients gave no valid reply
        trained_ranks = [self.client_rank(p) for p in partitions]
        next_ranks = [int(r.content["metrics"].get("next-rank", rank))
                      for r, rank in zip(valid, trained_ranks)]
        for partition, rank, next_rank in zip(partitions, trained_ranks, next_ranks):
            if next_rank != rank:  # the client pruned its rank: it trains at next_rank from now
                self.holdings.ranks[partition] = next_rank
        if not valid:
            if self.client_dp is not None and server_round > 0:
                self.client_dp.account_empty_round(server_round)
            return report
        # A pruned client's components beyond its new rank are dropped; under "pad" (and under
        # client-level DP, whose deltas need one shape) replies are zero-padded to the global rank.
        updates = [state_at_rank(r.content["arrays"].to_torch_state_dict(), rank)
                   for r, rank in zip(valid, next_ranks)]
        if self.rank_rule == "pad" or self.client_dp is not None:
            updates = [state_at_rank(update, self.cfg.rank) for update in updates]
        normalised = self.weighting.normalised
        if self.client_dp is not None:  # one noised pseudo-update; the method post-processes it
            updates = [self.client_dp.private_update(self.current, updates, server_round)]
            coefficients, normalised = [1.0], True
        weights, previous_weight = server_step_weights(coefficients, self.cfg.server_lr,
                                                       normalised=normalised)
        self.previous_in_updates = previous_weight != 0.0
        if self.previous_in_updates:
            updates.append({key: self.current[key] for key in updates[0]})
            weights.append(previous_weight)
        with single_threaded():
            new_state = self.aggregate(self.current, updates, weights)
        losses = sample_weights(num_examples)  # the reported loss is always the sample mean
        report.arrays = ArrayRecord(new_state)
        if self.client_dp is None and all("train_loss" in r.content["metrics"] for r in valid):
            # none under DP: record-level clients send none, client-level rows release none
            report.train_loss = sum(w * r.content["metrics"]["train_loss"]
                                    for w, r in zip(losses, valid))
        report.clients_trained = len(valid)
        report.client_weight_sum = sum(coefficients)
        return report

    def valid_setup_replies(self, replies: Iterable[Message], tensors: TensorSpec
                            ) -> list[Message]:
        """A method's set-up replies (``initialize``) that pass the reply schema for
        ``tensors`` (keys, shapes, finite values, ``num-examples``, the DP accountant; no norm
        bound: they are not updates of the global state), the DP ledger fed first as in a
        round; the others are logged and kept in ``setup_rejected`` (round 0's failures)."""
        schema = ReplySchema(tensors, self.nodes.examples, accountant=self.dp is not None)
        valid = []
        for reply in self.record_privacy(replies):
            reason = schema.problem(reply, self.nodes.partition_of)
            if reason is None:
                valid.append(reply)
                continue
            self.setup_rejected.append((reply.metadata.src_node_id, reason))
            log.warning("set-up: rejected the reply of node %s: %s", reply.metadata.src_node_id,
                        reason)
        return valid

    def private_setup(self, sums: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """A method's set-up release (``initialize``) under client-level DP: the clients' sums
        clipped and noised into one sum, charged to the run's accountant; as is otherwise."""
        return sums if self.client_dp is None else [self.client_dp.private_sum(sums)]

    def record_privacy(self, replies: Iterable[Message], declined: list[int] | None = None
                       ) -> list[Message]:
        """Step 3 under DP (``ServerPrivacy.incoming``): the replies to validate, less the
        clients that declined for lack of budget (appended to ``declined``)."""
        replies = list(replies)
        if self.dp is None:
            return replies
        kept, declined_now = self.dp.incoming(replies, self.nodes.partition_of)
        for partition_id in declined_now:
            log.info("round %d: client %d declined: its next round would exceed epsilon %g",
                     self.server_round, partition_id, self.dp.ledger.target_epsilon)
        if declined is not None:
            declined.extend(declined_now)
        return kept

    # fedlora evaluates the global model on the server (fedlora.run.server), never on clients.

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("%s: %s weighting, %s participation, server_lr %g%s", type(self).__name__,
                 self.cfg.weighting, self.cfg.participation.name, self.cfg.server_lr,
                 f", DP epsilon {self.cfg.dp.epsilon:g}" if self.dp else "")


def next_rank_problem(reply: Message, rank: int) -> str | None:
    """Why a valid reply's ``next-rank`` (the rank a client trains at from its next round, after
    pruning its own) cannot be used, or None: it must be an integer from 1 to ``rank``."""
    if reply.has_error() or "metrics" not in reply.content.metric_records:
        return None
    value = reply.content["metrics"].get("next-rank")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                         and value == int(value) and 1 <= value <= rank):
        return None
    return f"'next-rank' is {value!r}, not an integer from 1 to the client's rank {rank}"
