"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): train B with A frozen, then re-factorise.

    A_0:      random, from the shared init seed (round 1 is FFA-LoRA)
    clients:  train B (and the head) from the global (A_t, B_t); A frozen
    server:   B_bar <- B_t + sum_k c_k (B_k - B_t),  head <- E_w[head_k]
              every `fedsvd.period` rounds: B_bar A_t = B_new A_new with A_new A_new^T = I_r
              (thin-factor SVD, ``fedlora.aggregation.maths.refactorise_orthonormal``); A_{t+1} = A_new
    down:     B every round; A to every client whose A is not the current one (after a
              re-factorisation, or when it missed one)
    exact:    B_bar A_t = E_w[B_k A_t], and the re-factorisation keeps the product.

The client weights act on B's deltas before the SVD, never on the SVD factors (note B,
"Pitfalls"); ``period = 0`` never re-factorises and is FFA-LoRA exactly.
"""

from dataclasses import dataclass

import torch

from fedlora.model.adapters import factor_key, layer_names
from fedlora.aggregation.maths import refactorise_orthonormal
from fedlora.core.registry import register_strategy
from fedlora.core.settings import NONNEGATIVE, setting
from fedlora.strategies.ffa import FFA


@dataclass(frozen=True)
class FedSVDSettings:
    """FedSVD's re-factorisation schedule (``fedsvd.*``)."""

    period: int = setting(1, "re-factorise B A every this many rounds (the paper's scripts: 1); "
                          "0 never does, which is FFA-LoRA exactly", check=NONNEGATIVE)


class FedSVD(FFA):
    """FFA-LoRA's clients and uplink (A_0 from the seed); A changes on the server."""

    kept_parts = frozenset({"A"})  # the latest A a client received

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * (m + n)  # period 1: A and B after every re-factorisation

    @property
    def a_version(self) -> int:
        """Re-factorisations that changed A so far (0: the seeded A_0)."""
        return self.holdings.version("A")

    def aggregate(self, state, updates, weights):
        new_state = super().aggregate(state, updates, weights)  # B_bar and the head
        period = self.settings.period
        if period == 0 or self.server_round % period != 0:
            return new_state
        changed = False
        for layer in layer_names(state):
            B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
            B_new, A_new = refactorise_orthonormal(new_state[B_key], state[A_key])
            changed = changed or not torch.equal(A_new, state[A_key])
            new_state[B_key], new_state[A_key] = B_new, A_new
        if changed:
            self.holdings.advance("A")  # clients holding an older A are sent the new one
        return new_state

    def state_dict(self):
        # The version is the record's (``holdings``); also under its own name for checkpoint readers.
        return {**super().state_dict(), "a_version": self.a_version}


register_strategy("fedsvd", FedSVD, FedSVDSettings)
