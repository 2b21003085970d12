"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): FedIT plus the residual in W0.

    clients:  start from (W0_t, A_t, B_t), train A and B (and the head)
    server:   A_bar <- E_w[A_k],  B_bar <- E_w[B_k],  head <- E_w[head_k]
              residual = E_w[B_k A_k] - B_bar A_bar   (rank <= (K+1) r)
              W0_{t+1} = W0_t + s * residual   (s = alpha / r; in W0's own m x n layout)
    exact:    W0_{t+1} + s B_bar A_bar = W0_t + s E_w[B_k A_k].

Every client must hold the same W0_t: a client's base weight is the pretrained W0 plus the
sum of all residuals so far. The server keeps each round's residual factors and sends a
sampled client every residual it missed since it last took part (``catch_up``: the version of
the kept part ``base`` a client holds, in the coordinator's record
``fedlora.strategies.holdings``, is how many rounds it has added; `fedex.residual=dense`: their
sum, m x n per layer, the official behaviour; `factored`: the stacked factors of each missed
round, (K+1) r (m + n) per layer and round; K+2 pairs when FedAU or a server learning rate
adds the previous global pair as a term). The client adds them to the base delta it keeps in
its Context.state (``FedExClient``); a client whose reply was lost gets every residual
again and starts its delta afresh. The server's own model adds the global sum before
evaluation (``global_base_delta``). After a server restart the nodes' deltas are lost; the server
rebuilds each one from the residual messages it accepted (the record's history), exactly as
the node summed them, and sends it back once (``restore``).
"""

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedlora.model.adapters import factor_key, layer_names, residual_key, split_residual_key
from fedlora.aggregation.maths import product_mean_residual_factors, single_threaded
from fedlora.clients.hooks import ClientHooks
from fedlora.core.registry import register_strategy
from fedlora.core.settings import setting
from fedlora.strategies.fedavg import FedIT


@dataclass(frozen=True)
class FedExSettings:
    """How FedEx-LoRA's residual travels (``fedex.*``)."""

    residual: str = setting("dense", "dense: the m x n residual down (the official code) | "
                            "factored: its stacked factors, (K+1) r (m+n) per matrix and missed "
                            "round", choices=("dense", "factored"))


class FedEx(FedIT):
    """FedIT's clients and uplink; the residual rides on the downlink."""

    exact = True
    keeps_node_state = True  # each node's base delta (the residuals it added), in Context.state
    additive_parts = frozenset({"base"})  # its version: the rounds of residuals a client added
    moves_base_weights = True  # W0 + the residuals (``global_base_delta``)

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * (m + n) + m * n  # dense residual; factored: (K+1) r (m+n) per missed round

    def __init__(self, **arguments):  # FederatedLoRA's keyword arguments
        super().__init__(**arguments)
        self.residuals: list[dict[str, list[torch.Tensor]]] = []  # per round: layer -> [s B, A]
        self.base_delta: dict[str, torch.Tensor] = {}  # layer -> s * sum of all residuals
        self._catch_up: dict[int, dict[str, torch.Tensor]] = {}  # residuals held -> message

    def catch_up(self, part, partition, state):
        """``base``: the residual rounds the client has not added (its held version of
        ``base`` is how many it has), one message per starting point each round."""
        if part != "base":
            return super().catch_up(part, partition, state)
        held = self.holdings.held_version(partition, "base")
        if held not in self._catch_up:
            self._catch_up[held] = self.missed_residuals(self.residuals[held:])
        return self._catch_up[held]

    def config_down(self, node_id):
        partition = self.nodes.partition_of[node_id]
        return {"residual-from": self.holdings.held_version(partition, "base"),
                "residual-to": self.holdings.version("base")}

    def restore(self, part, partition, state, payload):
        """``base``: the base delta the client held, rebuilt bit for bit as it built it: the
        residual messages it accepted (``holdings.history``), replayed through the client's own
        ``update_base_delta``."""
        if part != "base":
            return super().restore(part, partition, state, payload)
        delta, held = {}, 0
        for start, end in self.holdings.history.get(partition, {}).get("base", []):
            delta, held = update_base_delta(delta, held, start, end,
                                            self.missed_residuals(self.residuals[start:end]))
        if not held:
            return {}, {}
        return {residual_key(layer): d for layer, d in delta.items()}, {"restore-base-held": held}

    def missed_residuals(self, missed: list[dict]) -> dict[str, torch.Tensor]:
        """The message tensors for residual rounds a client missed (scale s included)."""
        if not missed:
            return {}
        with single_threaded():  # the same sums whenever they are computed (restore_down)
            return self._stacked_residuals(missed)

    def _stacked_residuals(self, missed: list[dict]) -> dict[str, torch.Tensor]:
        message = {}
        for layer in missed[0]:
            B_stack = torch.cat([r[layer][0] for r in missed], dim=1)  # sum of products =
            A_stack = torch.cat([r[layer][1] for r in missed], dim=0)  # product of stacks
            if self.dense_messages():
                dense = B_stack.to(torch.float64) @ A_stack.to(torch.float64)
                message[residual_key(layer)] = dense.to(B_stack.dtype)
            else:
                message[residual_key(layer, "_B")] = B_stack
                message[residual_key(layer, "_A")] = A_stack
        return message

    def aggregate(self, state, updates, weights):
        new_state = super().aggregate(state, updates, weights)  # A_bar, B_bar and the head
        scale = self.alpha / self.rank
        residual = {}
        for layer in layer_names(state):
            B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
            B_stack, A_stack = product_mean_residual_factors([u[B_key] for u in updates],
                                                      [u[A_key] for u in updates], weights)
            residual[layer] = [scale * B_stack, A_stack]
        self.merge_into_base(residual)
        return new_state

    def dense_messages(self) -> bool:
        """Whether missed residuals travel as their m x n sum (else as stacked factors)."""
        return self.settings.residual == "dense"

    def merge_into_base(self, residual: dict[str, list[torch.Tensor]]) -> None:
        """Add one round's ``{layer: [B_stack, A_stack]}`` (scale folded into B) to the base
        weights: the server's sum, and the version of ``base`` clients must catch up to."""
        for layer, (B_stack, A_stack) in residual.items():
            increment = B_stack.to(torch.float64) @ A_stack.to(torch.float64)
            self.base_delta[layer] = self.base_delta.get(layer, 0) + increment
        self.residuals.append(residual)
        self.holdings.advance("base")
        self._catch_up = {}

    def global_base_delta(self):
        return dict(self.base_delta) or None

    def state_dict(self):
        return {**super().state_dict(), "residuals": self.residuals,
                "base_delta": self.base_delta}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.residuals = [{layer: list(f) for layer, f in r.items()} for r in state["residuals"]]
        self.base_delta = dict(state["base_delta"])
        self._catch_up = {}


def residual_increments(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base-weight increment per layer from a message's residual tensors: the dense sum
    as sent, or the product of the stacked factors ``B_stack @ A_stack``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays.items():
        layer, factor = split_residual_key(key)
        parts.setdefault(layer, {})[factor] = tensor
    return {layer: f[""] if "" in f else f["_B"] @ f["_A"] for layer, f in parts.items()}


def update_base_delta(delta: dict[str, torch.Tensor], held: int, start: int, end: int,
                      residuals: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A node's base delta after the residual rounds ``start..end`` the server sent, given
    that it has added ``held`` rounds so far. Returns ``(delta, rounds held)``.

    ``start = 0`` is every residual so far: the delta starts afresh (the server resends all
    after a lost reply, not knowing whether the node added the last ones)."""
    if end == held:  # nothing new (or already added before a lost reply)
        return delta, held
    if start == 0:
        delta = {}
    elif held != start:
        raise RuntimeError(f"the node holds the residuals of {held} rounds but the server sent "
                           f"rounds {start}..{end}")
    delta = dict(delta)
    for layer, increment in residual_increments(residuals).items():
        delta[layer] = delta[layer] + increment if layer in delta else increment.clone()
    return delta, end


def restored_base_delta(config: ConfigRecord, restore: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], int] | None:
    """The base delta this node held before a server restart and the residual rounds it
    covers, taken out of a ``restore`` record; None if the record carries none."""
    if "restore-base-held" not in config:
        return None
    residuals = {k: restore.pop(k) for k in list(restore) if split_residual_key(k)}
    return residual_increments(residuals), int(config["restore-base-held"])


def node_base_delta(context: Context, config: ConfigRecord,
                    residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """This node's accumulated base delta, updated in ``Context.state``."""
    records = context.state
    held = int(records["base-delta-rounds"]["rounds"]) if "base-delta-rounds" in records.config_records else 0
    delta = records["base-delta"].to_torch_state_dict() if held else {}
    delta, now_held = update_base_delta(delta, held, int(config.get("residual-from", 0)),
                                        int(config.get("residual-to", 0)), residuals)
    if now_held != held:
        records["base-delta"] = ArrayRecord(delta)
        records["base-delta-rounds"] = ConfigRecord({"rounds": now_held})
    return delta or None


class FedExClient(ClientHooks):
    """A FedEx-LoRA client trains on W0 plus its base delta: the sum of the residuals the
    server sent it, kept in its Context.state (``base-delta``, ``base-delta-rounds``)."""

    def restore(self, node, context, restore):
        lost = restored_base_delta(node.config, restore)  # takes the residual keys out
        if lost:
            context.state["base-delta"] = ArrayRecord(lost[0])
            context.state["base-delta-rounds"] = ConfigRecord({"rounds": lost[1]})
        return restore

    def before_training(self, node, context, received):
        residuals = {k: received.pop(k) for k in list(received) if split_residual_key(k)}
        node.bundle.set_base_delta(node_base_delta(context, node.config, residuals))
        return received


register_strategy("fedex", FedEx, FedExSettings, client=FedExClient)
