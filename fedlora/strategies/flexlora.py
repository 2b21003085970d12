"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): aggregate the full-size update, give
each client its best rank-r_k factorisation.

    clients:  train A_k, B_k (rank r_k) and the head from their download
    server:   dW = sum_k w_k s B_k A_k;  U S V^T = SVD(dW), once per layer and round
              a client of rank r gets B_r = U_r sqrt(S_r) / s,  A_r = sqrt(S_r) V_r^T:
              s B_r A_r is the best rank-r approximation of dW (Eckart-Young);
              head <- E_w[head_k]
    down:     r_k (m + n) per client: its truncation
    error:    ||dW - s B_r A_r||_F = the norm of the discarded singular values, logged per tier
    not exact: a truncation loses the tail beyond its rank (even with equal ranks, unlike FedIT
              it does not average the factors but truncates the mean of the products).

fedlora's decisions (docs/algorithms.md): the SVD is taken of the stacked factors (a QR of each,
the SVD of the small core, ``fedlora.aggregation.heterogeneous.truncated_factors``), never of the
m x n matrix, with the same result; the global adapter is the factorisation at the largest rank,
whose first r components are exactly the rank-r one (one SVD), so a client's download is those;
sqrt(S) is split between the factors as the paper does (the official code puts S on B); every
client uses the scale s = alpha / rank of the largest rank (the official code: alpha = 16 for
every rank); the weights are fedlora's c_k, and under a server learning rate or FedAU the
previous global pair enters dW as one more weighted term (the delta rule on products).
"""

import math

from fedlora.aggregation.heterogeneous import truncated_factors
from fedlora.aggregation.maths import weighted_mean_states
from fedlora.core.registry import register_strategy
from fedlora.model.adapters import factor_key, layer_names
from fedlora.strategies.fedavg import FedIT


class FlexLoRA(FedIT):
    """FedIT's clients and messages; the server truncates the mean of the products."""

    rank_rule = "stack"  # each reply at its own rank: the SVD takes any mix

    def __init__(self, **arguments):  # FederatedLoRA's keyword arguments
        super().__init__(**arguments)
        self.truncation_error: dict[int, float] = {}  # tier -> ||dW - truncation||_F, last round

    def tiers(self) -> list[int]:
        """The client ranks of the run, and the global (largest) rank."""
        return sorted(set(self.client_ranks) | {self.rank})

    def aggregate(self, state, updates, weights):
        heads = [k for k in updates[0] if self.part(k) == "head"]
        new_state = {**state, **weighted_mean_states(updates, weights, keys=heads)}
        scale = self.alpha / self.rank
        squared_errors = dict.fromkeys(self.tiers(), 0.0)
        for layer in layer_names(state):
            B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
            by_rank = truncated_factors([u[B_key] for u in updates], [u[A_key] for u in updates],
                                        weights, [scale] * len(updates), self.tiers(),
                                        dict.fromkeys(self.tiers(), scale))
            B, A, _ = by_rank[self.rank]
            new_state[B_key], new_state[A_key] = B.to(state[B_key].dtype), A.to(state[A_key].dtype)
            for rank, (_, _, error) in by_rank.items():
                squared_errors[rank] += error ** 2
        self.truncation_error = {rank: math.sqrt(e) for rank, e in squared_errors.items()}
        return new_state

    def state_dict(self):
        return {**super().state_dict(),
                "truncation_error": {str(r): e for r, e in self.truncation_error.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.truncation_error = {int(r): float(e) for r, e in state["truncation_error"].items()}

    def round_metrics(self):
        """The truncation error of the last aggregate, per client rank (over all layers)."""
        return {"truncation_error": {str(r): e for r, e in self.truncation_error.items()}} \
            if self.truncation_error else {}


register_strategy("flexlora", FlexLoRA)
