"""Server strategies, one file per method, each registering itself (``fedlora.core.registry``).

Each strategy is a Flower ``Strategy`` with explicit keyword arguments
(``FedSB(clients=10, rounds=20, ...)``, ``fedlora.strategies.base.FederatedLoRA``), so it
drops into any Flower ServerApp (docs/flower-apps.md); fedlora's own runs build it from their
config (``FederatedLoRA.from_config``).

Adding a method: one file here whose last line is ``register_strategy("<name>", Server,
Settings, client=ClientHooks)``, and its import below (the registry imports this package,
which imports each method by name, as peft's ``tuners/__init__.py`` does).

Layer 7: may import the clients (a method's client hooks live in its file) and every layer
below them; never the run loop.
"""

from fedlora.core.registry import get_method, methods
from fedlora.strategies.base import FederatedLoRA
from fedlora.strategies.fedavg import FedIT
from fedlora.strategies.fedex import FedEx, FedExSettings
from fedlora.strategies.fedsb import FedSB, FedSBSettings
from fedlora.strategies.fedsvd import FedSVD, FedSVDSettings
from fedlora.strategies.ffa import FFA
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.flora import FLoRA, FLoRASettings
from fedlora.strategies.hetlora import HetLoRA, HetLoRASettings
from fedlora.strategies.lorafair import LoRAFAIR, LoRAFAIRSettings
from fedlora.strategies.rolora import RoLoRA

DEFAULT_STRATEGY = "fedsb"  # what `python -m fedlora.simulate` runs without strategy=
STRATEGIES: dict[str, type[FederatedLoRA]] = {name: m.server for name, m in methods().items()}


def get_strategy(name: str) -> type[FederatedLoRA]:
    """The server class registered as ``name`` (a one-line ConfigError if there is none)."""
    return get_method(name).server


__all__ = ["DEFAULT_STRATEGY", "FFA", "FLoRA", "FLoRASettings", "FedEx", "FedExSettings", "FedIT",
           "FedSB", "FedSBSettings", "FedSVD", "FedSVDSettings", "FederatedLoRA", "FlexLoRA",
           "HetLoRA", "HetLoRASettings", "LoRAFAIR", "LoRAFAIRSettings", "RoLoRA", "STRATEGIES",
           "get_strategy"]
