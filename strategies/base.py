"""What every fedlora strategy shares: Flower's ``FedAvg`` hooks, specialised for adapters.

A strategy holds the global adapter state as the ``ArrayRecord`` Flower passes between
``configure_train`` and ``aggregate_train``; a subclass says which parts its clients train
(``trained_parts``), what it sends down (``payload_down``, ``config_down``), how it aggregates
(``aggregate``, calling ``fedlora.aggregation``), and its per-matrix communication formula.
Client weighting (samples, uniform, FedAU) and participation patterns live here, once, so
they compose with every method.

One training round, in this order:
  1. sample this round's clients: exactly ``clients_per_round`` with the run's seeded RNG
     (``participation=uniform``), or those a participation model marks active (bernoulli,
     markov, cyclic; ``fedlora.participation``);
  2. send each the tensors it needs and the client config (``configure_train``);
  3. clients train only ``trained_parts`` and reply with them (``fedlora.clients``); under DP
     they report their accountant (kept in ``self.privacy``), and one out of budget declines
     instead (never sampled again);
  4. reject replies that failed, miss keys, have wrong shapes/dtypes or non-finite values
     (logged with the reason; the global state never sees them); a round with fewer than
     ``min_clients`` valid replies is not aggregated at all (never partially);
  5. weight the valid replies: ``c_k = n_k / sum n`` (samples), ``1/K`` (uniform) or
     ``omega_k / N`` (FedAU, whose estimator steps every round, also a round without replies);
  6. aggregate on deltas, ``x <- x + eta * sum_k c_k (x_k - x)`` (``aggregate``, with the
     previous global value as one more weighted "client" where that rule needs it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora.adapters import part_of
from fedlora.aggregation import (sample_weights, server_step_weights, single_threaded,
                                 weighted_mean_states)
from fedlora.comm import RESTORE, STATE_LOST
from fedlora.config import round_lr
from fedlora.participation import (Bernoulli, Cyclic, FedAUWeights, Markov,
                                   participation_probabilities)
from fedlora.privacy import PrivacyLedger

log = logging.getLogger("fedlora")


class FederatedLoRA(FedAvg):
    name: str = ""
    latent: bool = False  # LoRA-SB's R between A and B
    exact: bool = False  # the paper's promise: the global update is E_w of the clients' updates
    trained_parts: tuple[str, ...] = ("A", "B", "head")
    one_time_parts_down: frozenset[str] = frozenset()  # bytes of these parts count as one-time
    kept_parts: frozenset[str] = frozenset()  # parts a client keeps between rounds (Context.state)
    keeps_node_state = property(lambda self: bool(self.kept_parts))  # FedEx: also its base delta
    seeded_parts: frozenset[str] = frozenset()  # parts a client rebuilds from the shared init seed
    # Defaults for keys left null in the config: rank, LoRA scale alpha/rank, client lr.
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-3}

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
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0,
                         min_train_nodes=cfg.clients_per_round, min_evaluate_nodes=0,
                         min_available_nodes=cfg.clients)
        self.cfg = cfg
        self.settings = cfg.settings  # the method's own ``<name>.*`` section (None: none)
        self.head_keys = head_keys
        self.rng = random.Random(cfg.seed)
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.participation = None  # a fedlora.participation model; None: uniform sampling
        self.participants: list[list[int]] = []  # partition ids sampled in rounds 1, 2, ...
        self.fedau = FedAUWeights(cfg.clients, cfg.fedau.cutoff) if cfg.weighting == "fedau" else None
        self.server_round = 0
        self.current: dict[str, torch.Tensor] = {}  # global state sent this round
        self.pending: dict[int, object] = {}  # node id -> what it was sent (see ``accepted``)
        self.client_reports: list[dict] = []  # per-client metrics of the last round
        self.rejected: list[tuple[int, str]] = []  # (node id, reason) of the last round
        self.restoring: set[int] = set()  # nodes that lost their Context.state (restarts)
        self.partitions_trained: set[int] = set()  # partitions whose node has replied validly
        self.declined_now = 0  # clients that declined in the last round (DP budget spent)
        # DP: the server's copy of each client's accountant, and who declined (fedlora.privacy)
        self.privacy = PrivacyLedger(cfg.dp.epsilon, cfg.dp.accountant) if cfg.dp.enabled else None

    # -- hooks a method overrides -----------------------------------------------------------

    def payload_down(self, node_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client receives: by default the parts it trains (the rest it already has).
        A method that sends a node something once records it in ``self.pending[node_id]``."""
        return {k: v for k, v in state.items() if self.part(k) in self.trained_parts}

    def config_down(self, node_id: int) -> dict:
        """Extra ConfigRecord values for one node (by default none)."""
        return {}

    def accepted(self, node_id: int, sent) -> None:
        """The node replied with a valid update, so it holds what it was sent this round
        (``sent = self.pending.get(node_id)``). Committing only now means a lost message is
        simply sent again."""

    def not_accepted(self, node_id: int, sent) -> None:
        """The node was sent ``sent`` (``self.pending``) but gave no valid reply: it may or may
        not hold it now."""

    def restore_down(self, node_id: int, state: dict[str, torch.Tensor],
                     payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a node that lost its Context.state needs on top of ``payload`` to train exactly
        as if it had kept it, and the config values that go with it: by default the current
        value of the parts it keeps (Fed-SB's B and A, FedSVD's A)."""
        return {k: v for k, v in state.items()
                if self.part(k) in self.kept_parts and k not in payload}, {}

    def rename_nodes(self, renamed: dict[int, int]) -> None:
        """Re-key per-node bookkeeping from the old node ids to ``renamed[old]`` (ids not in
        ``renamed`` stay)."""

    def aggregate(self, state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                  weights: list[float]) -> dict[str, torch.Tensor]:
        """The new global state: ``sum_j weights[j] * updates[j]`` for each trained tensor.

        ``updates`` are the clients' trained tensors, followed by the previous global values
        when the delta rule needs them (``fedlora.aggregation.server_step_weights``)."""
        return {**state, **weighted_mean_states(updates, weights)}

    def global_base_delta(self) -> dict[str, torch.Tensor] | None:
        """What the server's model adds to each adapted layer's pretrained base weight
        (``{layer: m x n}``); None: the base weights never change (all methods but FedEx)."""
        return None

    def initialize(self, grid, arrays: ArrayRecord, exchange) -> ArrayRecord:
        """One-time setup before round 1 (e.g. Fed-SB's gradient initialisation)."""
        return arrays

    def state_dict(self) -> dict:
        """Everything a restart needs, as plain Python values (JSON-able) in the base class;
        subclasses may add tensors (then save with ``torch.save``)."""
        version, internal, gauss = self.rng.getstate()
        state = {"rng": [version, list(internal), gauss],
                 "partition_of": sorted(self.partition_of.items()),
                 "participants": [list(p) for p in self.participants],
                 "partitions_trained": sorted(self.partitions_trained)}
        if self.participation is not None:
            state["participation"] = self.participation.state_dict()
        if self.fedau is not None:
            state["fedau"] = self.fedau.state_dict()
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.partition_of = {int(node): int(pid) for node, pid in state["partition_of"]}
        self.participants = [list(p) for p in state["participants"]]
        self.partitions_trained = set(state["partitions_trained"])
        if self.participation is not None:
            self.participation.load_state_dict(state["participation"])
        if self.fedau is not None:
            self.fedau.load_state_dict(state["fedau"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])

    def nodes_restarted(self, partition_of: dict[int, int]) -> None:
        """Nodes that came back with an empty Context.state, under new ids (``partition_of``,
        new node id -> partition id): all of them after a server restart
        (``load_state_dict``), or SuperNodes that rejoined during a run. The bookkeeping of
        who holds what is kept, re-keyed by partition, so messages and byte counts stay those
        of an uninterrupted run; each node's next message also carries a ``RESTORE`` record
        with what it lost (counted apart, ``fedlora.comm.CommLedger``)."""
        node_of = {pid: node for node, pid in partition_of.items()}
        renamed = {old: node_of[pid] for old, pid in self.partition_of.items() if pid in node_of}
        self.partition_of = {node: pid for node, pid in self.partition_of.items()
                             if pid not in node_of} | dict(partition_of)
        self.rename_nodes(renamed)
        self.restoring = (self.restoring - set(renamed)) | set(partition_of)

    # -- shared machinery --------------------------------------------------------------------

    def part(self, key: str) -> str | None:
        return part_of(key, self.head_keys)

    def register_nodes(self, partition_of: dict[int, int],
                       label_histograms: dict[int, list[int]] | None = None) -> None:
        """The connected nodes (node id -> partition id) and, for the participation models,
        each partition's label histogram (partition id -> counts per label)."""
        self.partition_of = dict(partition_of)
        settings = self.cfg.participation
        if settings.name == "uniform":
            return
        if label_histograms is None or set(label_histograms) != set(range(self.cfg.clients)):
            raise ValueError(f"participation={settings.name} needs the label histogram of each of "
                             f"the {self.cfg.clients} partitions")
        probabilities = participation_probabilities(
            [label_histograms[p] for p in range(self.cfg.clients)], self.cfg.seed,
            alpha_part=settings.alpha_part, mean_p=settings.mean_p, p_min=settings.p_min)
        seed = self.cfg.seed + 1  # not the probabilities' seed: an independent stream
        self.participation = {
            "bernoulli": lambda: Bernoulli(probabilities, seed),
            "markov": lambda: Markov(probabilities, seed, a=settings.a),
            "cyclic": lambda: Cyclic(probabilities, seed, cycle_length=settings.length),
        }[settings.name]()

    def sample(self, server_round: int) -> list[int]:
        """This round's nodes, reproducible from the seed (by partition id): ``clients_per_round``
        distinct ones (uniform, and always for the set-up round 0), or those the participation
        model marks active in training round ``server_round`` (possibly none)."""
        nodes = sorted(self.partition_of, key=self.partition_of.get)
        if self.privacy is not None:  # clients out of privacy budget are never sampled again
            nodes = [node for node in nodes if self.partition_of[node] not in self.privacy.declined]
        if self.participation is None or server_round == 0:
            chosen = self.rng.sample(nodes, min(self.cfg.clients_per_round, len(nodes)))
        else:
            active = set(self.participation.active(server_round - 1))
            chosen = [node for node in nodes if self.partition_of[node] in active]
        chosen = sorted(chosen, key=self.partition_of.get)
        if server_round > 0:
            self.participants.append([self.partition_of[node] for node in chosen])
        return chosen

    def participation_matrix(self) -> np.ndarray:
        """Boolean [rounds, clients]: which partitions were sampled in rounds 1, 2, ..."""
        matrix = np.zeros((len(self.participants), self.cfg.clients), dtype=bool)
        for row, partitions in enumerate(self.participants):
            matrix[row, partitions] = True
        return matrix

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        self.server_round = server_round
        self.current = arrays.to_torch_state_dict()
        self.pending = {}
        messages = []
        for node_id in self.sample(server_round):
            payload = self.payload_down(node_id, self.current)
            restore, restore_config = ({}, {}) if node_id not in self.restoring else \
                self.restore_down(node_id, self.current, payload)
            node_config = ConfigRecord({**config, "server-round": server_round,
                                        "lr": round_lr(self.cfg, server_round),
                                        "trained-parts": ",".join(self.trained_parts),
                                        "keep-parts": ",".join(sorted(self.kept_parts)),
                                        "seeded-parts": ",".join(sorted(self.seeded_parts)),
                                        # a node that trained before must still hold its state
                                        "expect-state": int(self.keeps_node_state
                                                            and node_id not in self.restoring and
                                                            self.partition_of[node_id] in self.partitions_trained),
                                        **self.config_down(node_id), **restore_config,
                                        **(self.privacy.config_for(self.partition_of[node_id])
                                           if self.privacy is not None else {})})
            content = RecordDict({"arrays": ArrayRecord(payload), "config": node_config})
            if restore:
                content[RESTORE] = ArrayRecord(restore)
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        return messages

    def check_reply(self, message: Message) -> str | None:
        """Why a reply must be rejected, or None if it is a valid update of the trained parts."""
        if message.has_error():
            return f"client error: {message.error.reason}"
        if "arrays" not in message.content.array_records or "metrics" not in message.content.metric_records:
            return "reply lacks 'arrays' or 'metrics'"
        if message.metadata.src_node_id not in self.partition_of:
            return f"reply from unknown node {message.metadata.src_node_id}"
        update = message.content["arrays"].to_torch_state_dict()
        expected = {k for k in self.current if self.part(k) in self.trained_parts}
        if set(update) != expected:
            extra, missing = sorted(set(update) - expected), sorted(expected - set(update))
            return f"keys differ from the trained parts (extra {extra[:3]}, missing {missing[:3]})"
        for key, tensor in update.items():
            reference = self.current[key]
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                return (f"'{key}' has shape {tuple(tensor.shape)} {tensor.dtype}, expected "
                        f"{tuple(reference.shape)} {reference.dtype}")
            if not torch.isfinite(tensor).all():
                return f"'{key}' has NaN or Inf values"
        if message.content["metrics"].get("num-examples", 0) <= 0:
            return "reply reports no training examples"
        return None

    def client_coefficients(self, partition_ids: list[int], num_examples: list[int]) -> list[float]:
        """``c_k`` of this round's valid replies (FedAU: advances the estimator by one round)."""
        if self.fedau is not None:
            omega = self.fedau.step(partition_ids)
            return [omega[p] / self.cfg.clients for p in partition_ids]
        if not partition_ids:
            return []
        if self.cfg.weighting == "uniform":
            return [1.0 / len(partition_ids)] * len(partition_ids)
        return sample_weights(num_examples)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, weight and aggregate one round's replies; ``(None, None)`` if none is valid
        (the global state stays as it was). Call it every round, with no replies too."""
        self.server_round = server_round
        valid, self.rejected = [], []
        for reply in self.record_privacy(replies):
            reason = self.check_reply(reply)
            if reason is None:
                valid.append(reply)
            else:
                self.rejected.append((reply.metadata.src_node_id, reason))
                log.warning("round %d: rejected the update of node %s: %s", server_round,
                            reply.metadata.src_node_id, reason)
                if STATE_LOST in reason:  # restarted under the same id: restore it next time
                    self.restoring.add(reply.metadata.src_node_id)
        # Replies arrive in any order; aggregating in partition order makes the sums exact
        # from run to run.
        valid.sort(key=lambda r: self.partition_of[r.metadata.src_node_id])
        if 0 < len(valid) < self.cfg.min_clients:
            log.warning("round %d: only %d valid replies, fewer than min_clients=%d: the round "
                        "is not aggregated (the global state stays as it was)", server_round,
                        len(valid), self.cfg.min_clients)
            valid = []
        self.restoring -= {r.metadata.src_node_id for r in valid}
        self.partitions_trained |= {self.partition_of[r.metadata.src_node_id] for r in valid}
        self.client_reports = [dict(r.content["metrics"]) for r in valid]
        num_examples = [int(r.content["metrics"]["num-examples"]) for r in valid]
        nodes = [r.metadata.src_node_id for r in valid]
        coefficients = self.client_coefficients([self.partition_of[n] for n in nodes], num_examples)
        for node_id in nodes:
            self.accepted(node_id, self.pending.get(node_id))
        for node_id in set(self.pending) - set(nodes):
            self.not_accepted(node_id, self.pending[node_id])
        if not valid:
            return None, None
        updates = [r.content["arrays"].to_torch_state_dict() for r in valid]
        weights, previous_weight = server_step_weights(coefficients, self.cfg.server_lr,
                                                       normalised=self.fedau is None)
        if previous_weight != 0.0:
            updates.append({key: self.current[key] for key in updates[0]})
            weights.append(previous_weight)
        with single_threaded():
            new_state = self.aggregate(self.current, updates, weights)
        losses = sample_weights(num_examples)  # the reported loss is always the sample mean
        train_loss = sum(w * r.content["metrics"]["train_loss"] for w, r in zip(losses, valid))
        return ArrayRecord(new_state), MetricRecord({"train_loss": train_loss,
                                                     "clients_trained": len(valid),
                                                     "client_weight_sum": sum(coefficients)})

    def record_privacy(self, replies: Iterable[Message]) -> list[Message]:
        """Under DP: copy each reply's accountant into the ledger and take out the clients that
        declined for lack of budget (they are not failures, and are never sampled again)."""
        replies = list(replies)
        self.declined_now = 0
        if self.privacy is None:
            return replies
        kept = []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            partition_id = self.partition_of.get(reply.metadata.src_node_id)
            if metrics is None or partition_id is None or "dp-epsilon" not in metrics:
                kept.append(reply)  # check_reply says what is wrong with it
                continue
            self.privacy.record(partition_id, metrics)
            if metrics.get("dp-declined"):
                self.privacy.decline(partition_id)
                self.declined_now += 1
                log.info("round %d: client %d declined: its next round would exceed epsilon %g",
                         self.server_round, partition_id, self.privacy.target_epsilon)
            else:
                kept.append(reply)
        return kept

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # fedlora evaluates the global model on the server (fedlora.server)
