"""Server strategies, one file per method, registered by name.

Adding a method: one file with a ``FederatedLoRA`` subclass, one ``register_strategy`` line.
"""

from fedlora.strategies.base import FederatedLoRA
from fedlora.strategies.fedavg import FedIT
from fedlora.strategies.fedex import FedEx
from fedlora.strategies.ffa import FFA
from fedlora.strategies.fedsb import FedSB
from fedlora.strategies.fedsvd import FedSVD
from fedlora.strategies.lorafair import LoRAFAIR

STRATEGIES: dict[str, type[FederatedLoRA]] = {}


def register_strategy(cls: type[FederatedLoRA]) -> type[FederatedLoRA]:
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy name '{cls.name}' is empty or already registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[FederatedLoRA]:
    if name not in STRATEGIES:
        from fedlora.errors import ConfigError

        raise ConfigError(f"strategy '{name}' is unknown; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


register_strategy(FedIT)
register_strategy(FFA)
register_strategy(FedSB)
register_strategy(FedSVD)
register_strategy(LoRAFAIR)
register_strategy(FedEx)

__all__ = ["FederatedLoRA", "FedIT", "FFA", "FedSB", "FedSVD", "LoRAFAIR", "FedEx", "STRATEGIES",
           "get_strategy", "register_strategy"]
