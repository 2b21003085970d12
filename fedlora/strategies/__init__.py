"""Server strategies, one file per method, each registering itself (``fedlora.core.registry``).

Adding a method: one file here whose last line is ``register_strategy("<name>", Server,
Settings, client=ClientHooks)``. The registry imports every module of this package on first
use (``fedlora.core.registry.Plugins``), so the new file is found with no other edit.

Layer 7: may import the clients (a method's client hooks live in its file) and every layer
below them; never the run loop.
"""

from fedlora.core.registry import get_method, methods
from fedlora.strategies.base import FederatedLoRA

DEFAULT_STRATEGY = "fedsb"  # what `python -m fedlora.simulate` runs without strategy=
# Built after DEFAULT_STRATEGY: listing the methods imports this package's modules.
STRATEGIES: dict[str, type[FederatedLoRA]] = {name: m.server for name, m in methods().items()}


def get_strategy(name: str) -> type[FederatedLoRA]:
    """The server class registered as ``name`` (a one-line ConfigError if there is none)."""
    return get_method(name).server


def __getattr__(name: str):
    """A registered server class by its class name (``from fedlora.strategies import FedSB``)."""
    for server in STRATEGIES.values():
        if server.__name__ == name:
            return server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FederatedLoRA", "STRATEGIES", "get_strategy"]
