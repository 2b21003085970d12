"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks by zero-padding,
sparsity-weighted aggregation, truncation and local rank self-pruning.

    down:     a client of rank r_k gets the first r_k components of the global (rank r_max)
              factors: B[:, :r_k], A[:r_k, :] (the head in full)
    clients:  train A_k, B_k and the head, minimising the loss plus the self-pruning term
              lambda ||B_k[:, g:]||_F ||A_k[g:, :]||_F, g = floor(gamma r_k); if that tail ends
              the round smaller than it began, the client prunes to rank g for later rounds
              (it reports ``next-rank``; the server drops its components beyond g)
    server:   zero-pad every reply to r_max; per layer
              p_k = ||s B_k A_k||_F / sum_j ||s B_j A_j||_F   (the sparsity weights)
              B <- sum_k p_k pad(B_k),  A <- sum_k p_k pad(A_k);  head <- E_w[head_k]
    not exact: a mean of factors, as FedIT (which it is with equal ranks, no pruning and
              `hetlora.weights=clients`).

fedlora's decisions (docs/algorithms.md): the sparsity weights are per adapted layer and replace
only the clients' share of the run's weights (sum_k p_k = sum_k c_k, so with FedAU or a server
learning rate the previous global pair keeps its term); the head, which the paper does not
have, is weighted by c_k as in every method. Every client uses the scale s = alpha / rank of
the largest rank, so padding and truncation keep each product. The pruning reference is the
tail of the factors the client received this round (the paper compares with "the previous
round"; the client keeps nothing between rounds). Under record-level DP the regulariser would
escape per-example clipping, so pruning needs ``dp.mode=client`` or ``hetlora.prune=false``.
"""

import math
from dataclasses import dataclass

import torch

from fedlora.aggregation.heterogeneous import sparsity_weights, tail_norm
from fedlora.aggregation.maths import weighted_mean_states
from fedlora.clients.hooks import ClientHooks
from fedlora.core.registry import register_strategy
from fedlora.core.settings import BELOW_ONE, NONNEGATIVE, POSITIVE, setting
from fedlora.model.adapters import factor_key, layer_names, lora_layers
from fedlora.strategies.fedavg import FedIT


@dataclass(frozen=True)
class HetLoRASettings:
    """HetLoRA's aggregation weights and rank self-pruning (``hetlora.*``)."""

    weights: str = setting("sparsity", "sparsity: ||s B_k A_k||_F per layer (the paper) | "
                           "clients: the run's weights c_k (then zero-padded FedIT plus pruning)",
                           choices=("sparsity", "clients"))
    prune: bool = setting(True, "rank self-pruning on the clients")
    decay: float = setting(0.99, "gamma: a pruning client keeps floor(gamma r) of its r ranks "
                           "(the FlexLoRA authors' HetLoRA: 0.99)", check=(POSITIVE, BELOW_ONE))
    prune_lambda: float = setting(1e-3, "lambda of the pruning term (the FlexLoRA authors' "
                                  "HetLoRA: 0.001)", check=NONNEGATIVE)


class HetLoRA(FedIT):
    """FedIT's messages at each client's rank; sparsity weights; pruning on the clients."""

    rank_rule = "pad"  # the coordinator zero-pads every reply to the largest rank

    @classmethod
    def config_problem(cls, settings, dp):
        if dp.record_level and settings.prune:
            return ("hetlora.prune=true with record-level DP (dp.epsilon): the pruning term is "
                    "not a per-example loss and would escape DP-SGD's clipping; set "
                    "hetlora.prune=false or dp.mode=client")
        return None

    def config_down(self, node_id):
        settings = self.settings
        return {"prune-decay": settings.decay, "prune-lambda": settings.prune_lambda} \
            if settings.prune else {}

    def aggregate(self, state, updates, weights):
        if self.settings.weights == "clients":
            return super().aggregate(state, updates, weights)
        heads = [k for k in updates[0] if self.part(k) == "head"]
        new_state = {**state, **weighted_mean_states(updates, weights, keys=heads)}
        clients = len(updates) - int(self.previous_in_updates)  # then the previous global pair
        share = sum(weights[:clients])
        scale = self.alpha / self.rank
        for layer in layer_names(state):
            keys = [factor_key(layer, "B"), factor_key(layer, "A")]
            sparsity = sparsity_weights([u[keys[0]] for u in updates[:clients]],
                                        [u[keys[1]] for u in updates[:clients]],
                                        [scale] * clients)
            factor_weights = [share * p for p in sparsity] + list(weights[clients:])
            new_state.update(weighted_mean_states(updates, factor_weights, keys=keys))
        return new_state

    def round_metrics(self):
        """How many clients train at each rank now (pruning moves them down)."""
        if not self.settings.prune:
            return {}
        counts: dict[str, int] = {}
        for partition in sorted(set(self.nodes.partition_of.values())):
            rank = str(self.client_rank(partition))
            counts[rank] = counts.get(rank, 0) + 1
        return {"rank_counts": dict(sorted(counts.items(), key=lambda item: -int(item[0])))}


class HetLoRAClient(ClientHooks):
    """Rank self-pruning: the tail term in the loss, and the decision after the local steps."""

    keep = 0  # ranks kept if the client prunes (0: it does not)

    def before_training(self, node, context, received):
        received = super().before_training(node, context, received)
        if "prune-decay" not in node.config:
            return received
        rank = int(node.config.get("client-rank", 0)) or int(node.config["rank"])
        self.keep = math.floor(float(node.config["prune-decay"]) * rank)
        self.tail_at_start = self.tail({layer: (received[factor_key(layer, "B")],
                                                received[factor_key(layer, "A")])
                                        for layer in layer_names(received)})
        return received

    def tail(self, factors: dict) -> float:
        with torch.no_grad():
            return float(sum(tail_norm(B, A, self.keep) for B, A in factors.values()))

    def training_loss(self, node, loss):
        if self.keep < 1:
            return loss
        layers = list(lora_layers(node.bundle.model).values())
        lam = float(node.config["prune-lambda"])

        def pruning_loss(model, batch, reduction="mean"):
            penalty = sum(tail_norm(layer.lora_B.weight, layer.lora_A.weight, self.keep)
                          for layer in layers)
            return loss(model, batch, reduction) + lam * penalty

        return pruning_loss

    def after_training(self, node, context, metrics):
        if self.keep < 1:
            return metrics
        tail_at_end = self.tail({name: (layer.lora_B.weight, layer.lora_A.weight)
                                 for name, layer in lora_layers(node.bundle.model).items()})
        return {**metrics, "next-rank": self.keep} if tail_at_end < self.tail_at_start else metrics


register_strategy("hetlora", HetLoRA, HetLoRASettings, client=HetLoRAClient)
