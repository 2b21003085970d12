"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stack the clients' adapters, merge them.

    clients:  fresh adapters at their own rank r_k every round (A_0 from the shared init seed,
              B_0 = 0, LoRA's init), trained with the head on W0_t
    server:   B_stack = [w_1 s B_1 ... w_K s B_K],  A_stack = [A_1; ...; A_K]   (R = sum_k r_k)
              W0_{t+1} = W0_t + B_stack A_stack = W0_t + sum_k w_k s B_k A_k   (any mix of ranks)
              head <- E_w[head_k];  the global adapter stays (B_0, A_0)
    down:     the stack of every round a client missed (the authors: "every round's stack must
              reach every client"): their m x n sum (`flora.stack=dense`, what the official
              code's merged model amounts to) or the stacks themselves (`factored`, the paper's:
              sum_j r_j (m + n) per missed round); never A or B
    exact:    W0_{t+1} + s B_0 A_0 = W0_t + sum_k w_k s B_k A_k (B_0 = 0), for any ranks.

Clients keep their base delta, the sum of the stacks they received, exactly as FedEx-LoRA's
clients keep the sum of its residuals (``FedExClient``); a client that missed rounds catches up
on all of them in one message, one whose reply was lost gets every stack again and starts its
sum afresh, and the coordinator's record (``holdings``) counts the rounds each client has
added. Under a server learning rate or FedAU the previous global pair enters as one more
weighted term, so the merge is the delta rule ``W + eta sum_k c_k (W_k - W)`` on the effective
weights; a term whose B is zero (the fresh adapters' B_0) adds nothing and is not sent.

fedlora's decisions (docs/algorithms.md): every client uses the scale s = alpha / rank of the
largest rank, so s is folded into the stacked B and the merge has scale 1 whatever the ranks
(the official code gets the same by alpha_k = 2 r_k); the weights are fedlora's c_k (sample
counts by default, as the official ``normalize(p=1)``).
"""

from dataclasses import dataclass

import torch

from fedlora.aggregation.heterogeneous import stacked_factors
from fedlora.aggregation.maths import weighted_mean_states
from fedlora.core.registry import register_strategy
from fedlora.core.settings import setting
from fedlora.model.adapters import factor_key, layer_names
from fedlora.strategies.fedex import FedEx, FedExClient


@dataclass(frozen=True)
class FLoRASettings:
    """How FLoRA's stacks reach the clients (``flora.*``)."""

    stack: str = setting("dense", "dense: the m x n sum of the stacks a client missed (the "
                         "official code sends the merged model) | factored: the stacks "
                         "themselves, sum_j r_j (m + n) per matrix and missed round (the paper)",
                         choices=("dense", "factored"))


class FLoRA(FedEx):
    """FedEx-LoRA's base-weight bookkeeping and clients; the adapters restart every round."""

    rank_rule = "stack"  # each reply at its own rank: the stack needs no padding
    kept_parts = frozenset({"A", "B"})  # never change (the shared init): never travel
    seeded_parts = frozenset({"A", "B"})

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        return rank * (m + n)

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return m * n  # dense; factored: sum_j r_j (m + n) per missed round

    def dense_messages(self) -> bool:
        return self.settings.stack == "dense"

    def aggregate(self, state, updates, weights):
        heads = [k for k in updates[0] if self.part(k) == "head"]
        new_state = {**state, **weighted_mean_states(updates, weights, keys=heads)}  # A and B stay (B_0, A_0)
        scale = self.alpha / self.rank
        stack = {}
        for layer in layer_names(state):
            B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
            # sum_j w_j s B_j A_j - (sum_j w_j) s B_0 A_0: the change of the effective weights
            terms = [(u[B_key], u[A_key], w) for u, w in zip(updates, weights)]
            terms.append((state[B_key], state[A_key], -sum(weights)))
            terms = [t for t in terms if torch.count_nonzero(t[0])] or terms[:1]  # B = 0: nothing
            B_stack, A_stack = stacked_factors([t[0] for t in terms], [t[1] for t in terms],
                                               [t[2] for t in terms], [scale] * len(terms))
            stack[layer] = [B_stack.to(state[B_key].dtype), A_stack.to(state[A_key].dtype)]
        self.merge_into_base(stack)
        return new_state


register_strategy("flora", FLoRA, FLoRASettings, client=FedExClient)
