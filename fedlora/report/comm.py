"""Communication accounting: bytes measured from the messages, and the formulas they must meet.

``tensor_bytes`` measures what a message carries: the elements of every array in its
ArrayRecords times the bytes per element of the dtype sent (read from the Array's own shape and
dtype fields). ``wire_bytes`` is Flower's ``count_bytes`` (the serialised ``np.save`` payloads
plus key names: a fixed header per array on top of ``tensor_bytes``).

Formulas (docs/algorithms.md, "Communication cost"): each strategy class states its
parameters per adapted m x n matrix; ``expected_params`` sums them over the model's layers and
adds the trained head.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from flwr.app import ArrayRecord, Message

from fedlora.model.adapters import part_of, split_residual_key


def message_part(key: str, head_keys) -> str:
    """The part a message key counts under: an adapter part ('A', 'B', 'R', 'head'),
    'residual' (FedEx-LoRA's base-weight residuals) or 'grad' (Fed-SB's init gradients)."""
    part = part_of(key, head_keys)
    if part is not None:
        return part
    return "residual" if split_residual_key(key) else "grad"


def array_bytes(array) -> int:
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


def tensor_bytes(record: ArrayRecord) -> int:
    return sum(array_bytes(a) for a in record.values())


RESTORE = "restore"  # the ArrayRecord that makes a node whole again after a server restart
# How a client's error reply begins when its Context.state is gone but the server expected it
# (a SuperNode restarted under the same node id, as with node authentication): the server then
# sends that node a ``RESTORE`` record with its next message.
STATE_LOST = "node state lost"


def message_arrays(message: Message) -> list[ArrayRecord]:
    """The records the method itself sends (all but ``RESTORE``, counted apart)."""
    return [r for name, r in message.content.array_records.items() if name != RESTORE]


class CommLedger:
    """Bytes per round and direction, split by part (``message_part``).

    Round 0 holds one-time exchanges before training (Fed-SB's gradient upload). A strategy
    marks parts of later messages as one-time too (Fed-SB's first B/A download to a client).
    What a resumed server re-sends to nodes that lost their state (the ``RESTORE`` record) is
    counted in ``recovery`` only, so a resumed run's rows equal an uninterrupted run's.
    """

    def __init__(self, part_of):
        self.part_of = part_of  # key -> part name
        self.rounds = defaultdict(lambda: {"up": defaultdict(int), "down": defaultdict(int)})
        self.one_time = {"up": 0, "down": 0}
        self.wire = {"up": 0, "down": 0}
        self.elements_up = defaultdict(list)  # round -> per-client elements uploaded (regular)
        self.recovery = {"up": 0, "down": 0}

    def record(self, server_round: int, direction: str, messages, one_time_parts=frozenset()):
        for message in messages:
            if message.has_error():
                continue
            if RESTORE in message.content.array_records:
                self.recovery[direction] += tensor_bytes(message.content[RESTORE])
            elements = 0
            for record in message_arrays(message):
                self.wire[direction] += record.count_bytes()
                for key, array in record.items():
                    part = self.part_of(key)
                    size = array_bytes(array)
                    self.rounds[server_round][direction][part] += size
                    if server_round == 0 or part in one_time_parts:
                        self.one_time[direction] += size
                    else:
                        elements += int(np.prod(array.shape, dtype=np.int64))
            if direction == "up" and server_round > 0:
                self.elements_up[server_round].append(elements)

    def round_bytes(self, server_round: int, direction: str) -> int:
        return sum(self.rounds[server_round][direction].values()) if server_round in self.rounds else 0

    def total(self, direction: str, upto: int | None = None) -> int:
        return sum(self.round_bytes(r, direction) for r in list(self.rounds) if upto is None or r <= upto)

    def params_up_per_client(self, server_round: int) -> int | None:
        counts = self.elements_up.get(server_round)
        return counts[0] if counts and len(set(counts)) == 1 else (max(counts) if counts else None)

    def state_dict(self) -> dict:
        return {"rounds": {r: {d: dict(p) for d, p in v.items()} for r, v in self.rounds.items()},
                "one_time": dict(self.one_time), "wire": dict(self.wire),
                "elements_up": {r: list(v) for r, v in self.elements_up.items()},
                "recovery": dict(self.recovery)}

    def load_state_dict(self, state: dict) -> None:
        self.rounds.clear()
        for r, directions in state["rounds"].items():
            for direction, parts in directions.items():
                self.rounds[int(r)][direction].update(parts)
        self.one_time, self.wire = dict(state["one_time"]), dict(state["wire"])
        self.elements_up = defaultdict(list, {int(r): list(v) for r, v in state["elements_up"].items()})
        self.recovery = dict(state.get("recovery", {"up": 0, "down": 0}))


def expected_params(strategy_cls, layer_shapes, rank: int, head_params: int,
                    server_round: int | None = None) -> dict[str, int]:
    """Per-client parameters in a steady-state round (every client took part in the previous
    one) from the strategy's formula, summed over layers, + head. ``server_round``: for a
    method whose messages alternate by round (``params_in_round``); None: its
    ``params_up``/``params_down``."""
    per_layer = [strategy_cls.params_in_round(m, n, rank, server_round) if server_round
                 else (strategy_cls.params_up(m, n, rank), strategy_cls.params_down(m, n, rank))
                 for m, n in layer_shapes]
    return {"up": sum(up for up, _ in per_layer) + head_params,
            "down": sum(down for _, down in per_layer) + head_params}
