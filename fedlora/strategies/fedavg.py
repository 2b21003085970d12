"""FedIT: FedAvg of LoRA factors (Zhang et al., "Towards Building the Federated GPT", 2023).

    clients:  train A and B (and the head) from the global (A, B)
    server:   A <- E_w[A_k],  B <- E_w[B_k],  head <- E_w[head_k]

Not exact: the global update E_w[B_k] E_w[A_k] differs from the clients' mean update
E_w[B_k A_k] by their cross-covariance (``fedlora.aggregation.maths.product_gap``).
"""

from fedlora.core.registry import register_strategy
from fedlora.strategies.base import FederatedLoRA


class FedIT(FederatedLoRA):
    trained_parts = ("A", "B", "head")
    rank_rule = "pad"  # clients of different ranks: zero-padded (docs/algorithms.md)
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-2}

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        return rank * (m + n)

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * (m + n)


register_strategy("fedavg", FedIT)
