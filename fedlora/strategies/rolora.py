"""RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755): alternating optimisation of LoRA.

    A_0, B_0:   A random from the shared init seed, B = 0 (every client rebuilds both)
    round t odd (a B round):   clients train B (and the head) with A frozen
                               server: B <- E_w[B_k],  head <- E_w[head_k]
    round t even (an A round): clients train A (and the head) with B frozen
                               server: A <- E_w[A_k],  head <- E_w[head_k]
    down:       a factor only to a client whose copy is not the current one: in the steady
                state the factor the previous round aggregated (B's r m in an A round, A's
                r n in a B round); the head every round
    up:         the factor trained this round (r m in B rounds, r n in A rounds) and the head
    exact:      the frozen factor is the same on every client, so E_w[B_k] A = E_w[B_k A] and
                B E_w[A_k] = E_w[B A_k]: each aggregate is the mean of the clients' updates.

The paper's Algorithm 1 alternates the two phases, each its own communication round; fedlora
starts with B because B_0 = 0 makes the gradient of A zero (dL/dA = s B^T (dL/dy) x^T), so an
A round first would not move. Client weights act on the trained factor's deltas, as for every
method (``server_lr``, FedAU).
"""

from fedlora.core.registry import register_strategy
from fedlora.strategies.base import FederatedLoRA

FACTORS = ("A", "B")


class RoLoRA(FederatedLoRA):
    """B rounds and A rounds alternate; a client keeps the factors it was sent."""

    exact = True
    trained_parts = ("A", "B", "head")  # over the run; ``trained_parts_in`` says which per round
    kept_parts = frozenset(FACTORS)  # the latest A and B a client received
    seeded_parts = frozenset(FACTORS)  # A_0 and B_0 from the shared init
    rank_rule = "pad"  # clients of different ranks: zero-padded (docs/algorithms.md)
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-2}

    @staticmethod
    def trained_factor(server_round: int) -> str:
        return "B" if server_round % 2 == 1 else "A"

    def trained_parts_in(self, server_round: int) -> tuple[str, ...]:
        return (self.trained_factor(server_round), "head")

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        return rank * m  # a B round; an A round uploads r n (``params_in_round``)

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * n  # a B round gets the A of the round before; an A round gets r m of B

    @classmethod
    def params_in_round(cls, m: int, n: int, rank: int, server_round: int) -> tuple[int, int]:
        up, down = cls.params_up(m, n, rank), cls.params_down(m, n, rank)
        return (up, down) if cls.trained_factor(server_round) == "B" else (down, up)

    def aggregate(self, state, updates, weights):
        new_state = super().aggregate(state, updates, weights)  # the trained factor, the head
        # clients holding the factor's older value are sent the new one (holdings)
        self.holdings.advance(self.trained_factor(self.server_round))
        return new_state


register_strategy("rolora", RoLoRA)
