"""A small DP federation in one process: a method's real server strategy and the real
ClientApp handlers (``query.describe``, ``train.setup``, ``train``) on the embedded model,
with no Ray and no grid; every message and reply is kept for inspection."""

from __future__ import annotations

from functools import cached_property

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.model import pretrained as models
from fedlora.clients import app as client_app
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.config import RunConfig, client_config, resolve_noise
from fedlora.strategies import get_strategy

NUM_LABELS = 21
CLIENTS = 4


def dp_config(strategy: str, deployment: bool = False, **overrides) -> RunConfig:
    raw = {"strategy": strategy, "clients": CLIENTS, "clients_per_round": 2, "rank": 2,
           "seed": 0, "local_steps": 2, "batch_size": 4, "max_length": 16, "rounds": 2,
           "fedsb": {"init_samples": 8}, "dp": {"epsilon": 3.0}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return resolve_noise(RunConfig.from_dict(raw), deployment=deployment)


class DPFederation:
    """``CLIENTS`` nodes (ids 10 + partition) with their own ``Context.state``; ``sent`` and
    ``replies`` hold every message in order, as ``(message_type, message)``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.bundle = models.cached_model(cfg.model_spec(NUM_LABELS))
        self.client_config = client_config(cfg, NUM_LABELS)
        self.contexts = {10 + p: Context(run_id=1, node_id=10 + p, state=RecordDict(),
                                         run_config={},
                                         node_config={"partition-id": p,
                                                      "num-partitions": CLIENTS})
                         for p in range(CLIENTS)}
        self.sent: list[tuple[str, Message]] = []
        self.replies: list[tuple[str, Message]] = []

    @cached_property
    def server(self):
        """The method's server strategy (uniform sampling: it needs no label histograms)."""
        server = get_strategy(self.cfg.strategy).from_config(self.cfg, self.bundle.head_keys)
        server.register_nodes({10 + p: p for p in range(CLIENTS)})
        return server

    def __call__(self, server_round: int, messages: list[Message]) -> list[Message]:
        """The exchange a strategy's ``initialize`` sends through (and the train rounds)."""
        handlers = {SETUP_MESSAGE_TYPE: client_app.setup, "train": client_app.train,
                    "query.describe": client_app.describe}
        replies = []
        for message in messages:
            kind = message.metadata.message_type
            reply = handlers[kind](message, self.contexts[message.metadata.dst_node_id])
            self.sent.append((kind, message))
            self.replies.append((kind, reply))
            replies.append(reply)
        return replies

    def describe(self) -> list[Message]:
        messages = [Message(content=RecordDict({"config": ConfigRecord(self.client_config)}),
                            message_type="query.describe", dst_node_id=node)
                    for node in self.contexts]
        return self(0, messages)

    def run(self) -> ArrayRecord:
        """The method's initialisation, then every round; the final global state."""
        arrays = self.server.initialize(None, ArrayRecord(self.bundle.initial_state), self)
        for server_round in range(1, self.cfg.rounds + 1):
            messages = list(self.server.configure_train(server_round, arrays,
                                                        ConfigRecord(self.client_config), None))
            new_arrays, _ = self.server.aggregate_train(server_round, self(server_round, messages))
            arrays = new_arrays or arrays
        return arrays
