"""A fake federation for strategy tests, without Ray, a grid or a model.

Hand-made float64 adapter states (two non-square 6 x 5 layers, rank 2, a 3-label head), fake
clients that assemble their full state exactly as the ClientApp does (``fedlora.clients.app``:
sent, else kept, else from the shared seed; FedEx residuals added to a kept base delta), perturb
the parts they train and reply with Flower ``Message``s built as the ClientApp builds them.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.model.adapters import factor_key, part_of, split_residual_key, state_at_rank
from fedlora.clients.app import check_state_kept, full_adapter_state
from fedlora.config import RunConfig
from fedlora.aggregation.participation import FedAUWeights
from fedlora.strategies import get_strategy
from fedlora.strategies.fedex import restored_base_delta, update_base_delta

F64 = torch.float64
M, N, RANK, ALPHA = 6, 5, 2, 4.0  # base weights are m x n = out x in, non-square on purpose
SCALE = ALPHA / RANK
LAYERS = ("encoder.0.query", "encoder.0.value")
HEAD_KEYS = frozenset({"head.weight", "head.bias"})
NUM_LABELS = 3
CLIENTS = 4
SIZES = (10, 20, 30, 45)  # examples per partition: unequal unless a test says otherwise
HISTOGRAMS = {0: [10, 0, 0], 1: [5, 15, 0], 2: [0, 10, 20], 3: [15, 15, 15]}


def make_cfg(strategy: str, **overrides) -> RunConfig:
    """A run of CLIENTS clients at RANK and scale SCALE; with ``client_ranks``, the global rank
    is their largest and alpha keeps the scale SCALE."""
    ranks = overrides.get("client_ranks")
    rank = max(ranks) if ranks else RANK
    raw = {"strategy": strategy, "clients": CLIENTS, "clients_per_round": CLIENTS, "rank": rank,
           "alpha": SCALE * rank, "rounds": 6, "seed": 0, **overrides}
    return RunConfig.from_dict(raw)


def initial_state(latent: bool, seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """The adapter and head state every party rebuilds from the shared seed. B is non-zero (as
    after some training) so that products are non-trivial from round 1."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in LAYERS:
        if latent:  # LoRA-SB: orthonormal B and A, R trained
            state[factor_key(layer, "B")] = torch.linalg.qr(torch.randn(M, rank, generator=gen, dtype=F64))[0]
            state[factor_key(layer, "R")] = torch.randn(rank, rank, generator=gen, dtype=F64)
            state[factor_key(layer, "A")] = torch.linalg.qr(torch.randn(N, rank, generator=gen, dtype=F64))[0].T.contiguous()
        else:
            state[factor_key(layer, "A")] = torch.randn(rank, N, generator=gen, dtype=F64) / N ** 0.5
            state[factor_key(layer, "B")] = torch.randn(M, rank, generator=gen, dtype=F64)
    state["head.weight"] = torch.randn(NUM_LABELS, N, generator=gen, dtype=F64)
    state["head.bias"] = torch.randn(NUM_LABELS, generator=gen, dtype=F64)
    return state


def parts(config: ConfigRecord, key: str) -> set[str]:
    return {p for p in str(config.get(key, "")).split(",") if p}


def reply(message: Message, arrays: dict[str, torch.Tensor], num_examples: int, **metrics) -> Message:
    """A train reply as the ClientApp builds it."""
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
        {"num-examples": num_examples, "train_loss": 0.0, **metrics})})
    return Message(content, reply_to=message)


class FakeClient:
    """One node: keeps what the ClientApp keeps in its Context.state."""

    def __init__(self, partition_id: int, num_examples: int, initial: dict[str, torch.Tensor]):
        self.partition_id = partition_id
        self.num_examples = num_examples
        self.initial = initial
        self.kept: dict[str, torch.Tensor] = {}
        self.base_delta: dict[str, torch.Tensor] = {}
        self.residuals_held = 0
        self.has_state = False  # the ClientApp's NODE_MARK in Context.state
        self.trained_from: dict[str, torch.Tensor] = {}  # full state of its last round
        self.update: dict[str, torch.Tensor] = {}  # what it sent back
        self.metrics = {"pid": 1, "model-builds": 1}  # what the server loop reads as well

    def train(self, message: Message, seed: int, step: float = 0.1) -> Message:
        config = message.content["config"]
        check_state_kept(config, self.has_state)
        self.has_state = True
        received = message.content["arrays"].to_torch_state_dict()
        if "restore" in message.content.array_records:  # what it lost in a server restart
            restore = message.content["restore"].to_torch_state_dict()
            lost_base = restored_base_delta(config, restore)
            if lost_base:
                self.base_delta, self.residuals_held = lost_base
            received.update(restore)
        residuals = {k: received.pop(k) for k in list(received) if split_residual_key(k)}
        self.base_delta, self.residuals_held = update_base_delta(
            self.base_delta, self.residuals_held, int(config.get("residual-from", 0)),
            int(config.get("residual-to", 0)), residuals)
        keep, seeded = parts(config, "keep-parts"), parts(config, "seeded-parts")
        self.kept.update({k: v for k, v in received.items() if part_of(k, HEAD_KEYS) in keep})
        seeds = {k: v for k, v in self.initial.items() if part_of(k, HEAD_KEYS) in seeded}
        if "client-rank" in config:  # its own rank: the seed's first components, as the app
            seeds = state_at_rank(seeds, int(config["client-rank"]))
        self.trained_from = full_adapter_state(received, self.kept, seeds, self.initial)
        trained = parts(config, "trained-parts")
        gen = torch.Generator().manual_seed(seed)
        self.update = {k: v + step * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                       for k, v in self.trained_from.items() if part_of(k, HEAD_KEYS) in trained}
        return reply(message, self.update, self.num_examples, **self.metrics)

    def effective_weights(self, W0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``W0 + base delta + s B [R] A`` per layer after its local training."""
        return effective_weights({**self.trained_from, **self.update}, W0, self.base_delta)


def effective_weights(state, W0, base_delta) -> dict[str, torch.Tensor]:
    out = {}
    for layer in LAYERS:
        B, A = state[factor_key(layer, "B")], state[factor_key(layer, "A")]
        middle = A if factor_key(layer, "R") not in state else state[factor_key(layer, "R")] @ A
        out[layer] = W0[layer] + (base_delta or {}).get(layer, 0) + SCALE * B @ middle
    return out


class Federation:
    """A strategy, its fake clients (node ids 100 + partition id) and the global state."""

    def __init__(self, strategy: str, sizes=SIZES, **overrides):
        self.cfg = make_cfg(strategy, **overrides)
        cls = get_strategy(strategy)
        self.strategy = cls.from_config(self.cfg, HEAD_KEYS)
        self.initial = initial_state(cls.latent, rank=self.cfg.rank)
        self.clients = {100 + p: FakeClient(p, sizes[p], self.initial) for p in range(CLIENTS)}
        self.strategy.register_nodes({node: c.partition_id for node, c in self.clients.items()},
                                     HISTOGRAMS,
                                     {c.partition_id: c.num_examples for c in self.clients.values()})
        self.arrays = ArrayRecord(self.initial)
        gen = torch.Generator().manual_seed(99)
        self.W0 = {layer: torch.randn(M, N, generator=gen, dtype=F64) for layer in LAYERS}
        self.round = 0
        self.reference_fedau = FedAUWeights(CLIENTS, self.cfg.fedau.cutoff)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.arrays.to_torch_state_dict()

    def configure(self) -> list[Message]:
        self.round += 1
        return list(self.strategy.configure_train(self.round, self.arrays, ConfigRecord({}), None))

    def train(self, messages: list[Message]) -> list[Message]:
        return [self.clients[m.metadata.dst_node_id].train(m, seed=1000 * self.round + i)
                for i, m in enumerate(messages)]

    def aggregate(self, replies: list[Message]):
        arrays, metrics = self.strategy.aggregate_train(self.round, replies)
        if arrays is not None:
            self.arrays = arrays
        return arrays, metrics

    def run_round(self):
        messages = self.configure()
        replies = self.train(messages)
        self.aggregate(replies)
        return messages, replies

    def global_effective_weights(self) -> dict[str, torch.Tensor]:
        return effective_weights(self.state, self.W0, self.strategy.global_base_delta())

    def reference_coefficients(self, partition_ids: list[int]) -> list[float]:
        """``c_k`` by the spec, computed independently of the strategy (FedAU: its own
        estimator, stepped with the same participants)."""
        if self.cfg.weighting == "fedau":
            omega = self.reference_fedau.step(partition_ids)
            return [omega[p] / CLIENTS for p in partition_ids]
        if self.cfg.weighting == "uniform":
            return [1 / len(partition_ids)] * len(partition_ids)
        sizes = [self.clients[100 + p].num_examples for p in partition_ids]
        return [n / sum(sizes) for n in sizes]
