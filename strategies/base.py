"""What every fedlora strategy shares: Flower's ``FedAvg`` hooks, specialised for adapters.

A strategy holds the global adapter state as the ``ArrayRecord`` Flower passes between
``configure_train`` and ``aggregate_train``; a subclass says which parts its clients train
(``trained_parts``), what it sends down (``payload_down``), how it aggregates (``aggregate``,
calling ``fedlora.aggregation``), and its per-matrix communication formula.

One training round, in this order:
  1. sample ``clients_per_round`` clients with the run's seeded RNG (all nodes known first);
  2. send each the tensors it needs and the client config (``configure_train``);
  3. clients train only ``trained_parts`` and reply with them (``fedlora.clients``);
  4. reject replies that failed, miss keys, have wrong shapes/dtypes or non-finite values
     (logged with the reason; the global state never sees them);
  5. aggregate the valid replies with sample-size weights ``n_k / sum n_j`` (``aggregate``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora.adapters import part_of
from fedlora.aggregation import sample_weights, single_threaded, weighted_mean_states
from fedlora.config import round_lr

log = logging.getLogger("fedlora")


class FederatedLoRA(FedAvg):
    name: str = ""
    latent: bool = False  # LoRA-SB's R between A and B
    trained_parts: tuple[str, ...] = ("A", "B", "head")
    one_time_parts_down: frozenset[str] = frozenset()  # parts a client downloads only once
    # Defaults for keys left null in the config: rank, LoRA scale alpha/rank, client lr.
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-3}

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        """Parameters one client uploads per round for one adapted m x n matrix."""
        raise NotImplementedError

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        """Parameters one client downloads per round for one adapted m x n matrix."""
        raise NotImplementedError

    def __init__(self, cfg, head_keys: frozenset[str]):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0,
                         min_train_nodes=cfg.clients_per_round, min_evaluate_nodes=0,
                         min_available_nodes=cfg.clients)
        self.cfg = cfg
        self.head_keys = head_keys
        self.rng = random.Random(cfg.seed)
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.current: dict[str, torch.Tensor] = {}  # global state sent this round
        self.client_reports: list[dict] = []  # per-client metrics of the last round

    # -- hooks a method overrides -----------------------------------------------------------

    def payload_down(self, node_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client receives: by default the parts it trains (the rest it already has)."""
        return {k: v for k, v in state.items() if self.part(k) in self.trained_parts}

    def aggregate(self, state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                  weights: list[float]) -> dict[str, torch.Tensor]:
        """The new global state from the clients' trained tensors: by default ``E_w`` of each."""
        return {**state, **weighted_mean_states(updates, weights)}

    def initialize(self, grid, arrays: ArrayRecord, exchange) -> ArrayRecord:
        """One-time setup before round 1 (e.g. Fed-SB's gradient initialisation)."""
        return arrays

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "partition_of": dict(self.partition_of)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.partition_of = dict(state["partition_of"])

    # -- shared machinery --------------------------------------------------------------------

    def part(self, key: str) -> str | None:
        return part_of(key, self.head_keys)

    def register_nodes(self, partition_of: dict[int, int]) -> None:
        self.partition_of = dict(partition_of)

    def sample(self, server_round: int) -> list[int]:
        """``clients_per_round`` distinct nodes, reproducible from the seed (by partition id)."""
        nodes = sorted(self.partition_of, key=self.partition_of.get)
        return sorted(self.rng.sample(nodes, self.cfg.clients_per_round), key=self.partition_of.get)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        messages = []
        for node_id in self.sample(server_round):
            payload = self.payload_down(node_id, self.current)
            node_config = ConfigRecord({**config, "server-round": server_round,
                                        "lr": round_lr(self.cfg, server_round),
                                        "trained-parts": ",".join(self.trained_parts),
                                        "keep-parts": ",".join(sorted(self.one_time_parts_down))})
            content = RecordDict({"arrays": ArrayRecord(payload), "config": node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        return messages

    def check_reply(self, message: Message) -> str | None:
        """Why a reply must be rejected, or None if it is a valid update of the trained parts."""
        if message.has_error():
            return f"client error: {message.error.reason}"
        if "arrays" not in message.content.array_records or "metrics" not in message.content.metric_records:
            return "reply lacks 'arrays' or 'metrics'"
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = []
        for reply in replies:
            reason = self.check_reply(reply)
            if reason is None:
                valid.append(reply)
            else:
                log.warning("round %d: rejected the update of node %s: %s", server_round,
                            reply.metadata.src_node_id, reason)
        self.client_reports = [dict(r.content["metrics"]) for r in valid]
        if not valid:
            return None, None
        updates = [r.content["arrays"].to_torch_state_dict() for r in valid]
        weights = sample_weights([int(r.content["metrics"]["num-examples"]) for r in valid])
        with single_threaded():
            new_state = self.aggregate(self.current, updates, weights)
        train_loss = sum(w * r.content["metrics"]["train_loss"] for w, r in zip(weights, valid))
        return ArrayRecord(new_state), MetricRecord({"train_loss": train_loss,
                                                     "clients_trained": len(valid)})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # fedlora evaluates the global model on the server (fedlora.server)
