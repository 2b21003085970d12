"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): train B only, A frozen at its init.

    A:        random (Kaiming-uniform), frozen, identical on the server and every client:
              each rebuilds it from the shared init seed, so it never travels
    clients:  train B (and the head) from the global B
    server:   B <- E_w[B_k],  head <- E_w[head_k]
    exact:    E_w[B_k] A = E_w[B_k A]  (A is shared), so this is FedAvg of the clients' updates.
"""

from fedlora.core.registry import register_strategy
from fedlora.strategies.base import FederatedLoRA


class FFA(FederatedLoRA):
    exact = True
    trained_parts = ("B", "head")
    seeded_parts = frozenset({"A"})
    rank_rule = "pad"  # clients of different ranks: zero-padded (docs/algorithms.md)
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-2}

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        return rank * m

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * m


register_strategy("ffa", FFA)
