"""LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): FedIT with a server-side correction of B.

    clients:  train A and B (and the head) from the global (A, B)
    server:   A_bar <- E_w[A_k],  B_bar <- E_w[B_k],  dW* = E_w[B_k A_k]  (thin factors only)
              dB = argmin_D 1 - cos(dW*, (B_bar + D) A_bar) + lam ||D||_F   from D = 0
                   (`lorafair.objective=cos`, the paper's), or the closed-form ridge
                   (B_bar + D) A_bar ~ dW* (`objective=ls`)
              clients start the next round from (A_bar, B_bar + dB); W0 never changes
    not exact, but (B_bar + dB) A_bar is never further from dW* than FedIT's B_bar A_bar.

Under FedAU or a server learning rate the means and dW* are taken in delta form, with the
previous global pair as one more weighted client (``fedlora.aggregation.maths.server_step_weights``).
"""

from dataclasses import dataclass

from fedlora.model.adapters import factor_key, layer_names
from fedlora.aggregation.maths import product_correction_cos, product_correction_ls
from fedlora.core.registry import register_strategy
from fedlora.core.settings import NONNEGATIVE, setting
from fedlora.strategies.fedavg import FedIT


@dataclass(frozen=True)
class LoRAFAIRSettings:
    """LoRA-FAIR's server correction of B (``lorafair.*``)."""

    objective: str = setting("cos", "cos: 1 - cos + lam ||dB||_F by Adam on the server (the "
                             "paper's) | ls: the closed-form ridge", choices=("cos", "ls"))
    lam: float = setting(0.01, "the regularisation weight lambda (paper: 0.01)", check=NONNEGATIVE)
    steps: int = setting(200, "server Adam steps of the cos objective (not given by the paper)",
                         check=NONNEGATIVE)


class LoRAFAIR(FedIT):
    """FedIT's clients, messages and traffic; only the server's B differs."""

    def aggregate(self, state, updates, weights):
        new_state = super().aggregate(state, updates, weights)  # A_bar, B_bar and the head
        settings = self.settings
        for layer in layer_names(state):
            B_key, A_key = factor_key(layer, "B"), factor_key(layer, "A")
            Bs, As = [u[B_key] for u in updates], [u[A_key] for u in updates]
            if settings.objective == "ls":
                correction = product_correction_ls(Bs, As, weights, settings.lam)
            else:
                correction = product_correction_cos(Bs, As, weights, settings.lam, settings.steps)
            new_state[B_key] = new_state[B_key] + correction
        return new_state


register_strategy("lorafair", LoRAFAIR, LoRAFAIRSettings)
