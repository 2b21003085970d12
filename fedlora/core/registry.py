"""The method registry: every federated LoRA method registers itself here, with its settings.

A method is one file in ``strategies/`` that ends with one line::

    register_strategy("fedsb", FedSB, FedSBSettings, client=FedSBClient)

naming its server strategy class, the frozen dataclass of its hyper-parameters (its config
section ``<name>.<field>``: defaults, bounds and help text live in the fields' metadata, read by
``fedlora.core.settings``), and its client-side hooks (what its clients do beyond the generic local
training: Fed-SB's initialisation gradient, FedEx-LoRA's base-weight bookkeeping). Generic code
(config parsing, the Hydra config, Flower's run config, the client, DP, comm accounting) reads
this registry and never names a method.

The registry fills itself on first use by importing ``fedlora.strategies``, whose
``__init__`` imports each method's module by name (as peft's ``tuners/__init__.py`` imports
each tuner), so importing the registry costs nothing and creates no import cycle with the
modules a strategy itself imports.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from fedlora.core.errors import ConfigError

STRATEGY_PACKAGE = "fedlora.strategies"  # its DEFAULT_STRATEGY: what runs without strategy=


@dataclass(frozen=True)
class Method:
    """One registered method: its name, server strategy, settings and client hooks."""

    name: str
    server: type  # a ``fedlora.strategies.base.FederatedLoRA`` subclass
    settings: type | None = None  # frozen dataclass: the ``<name>.*`` config section
    client: type | None = None  # a ``fedlora.clients.hooks.ClientHooks`` subclass; None: generic


class Plugins:
    """Named plugins of one kind (methods, tasks) that register themselves from the modules of
    one package, imported on first use. ``scan``: import every module the package holds
    (``pkgutil``; for a package whose modules import the package itself); otherwise importing
    the package is enough: its ``__init__`` imports each plugin module by name."""

    def __init__(self, kind: str, package: str, scan: bool = True):
        self.kind, self.package, self.scan = kind, package, scan
        self.registered: dict[str, object] = {}
        self.discovered = False

    def add(self, name: str, plugin) -> None:
        """Register ``plugin`` as ``name`` (lower-case letters and digits, not taken yet)."""
        if not name or not name.isalnum() or name != name.lower():
            raise ValueError(f"{self.kind} name '{name}' must be lower-case letters and digits")
        if name in self.registered:
            raise ValueError(f"{self.kind} name '{name}' is already registered")
        self.registered[name] = plugin

    def all(self) -> dict:
        """Every registered plugin by name, in alphabetical order."""
        if not self.discovered:
            self.discovered = True
            package = importlib.import_module(self.package)
            if self.scan:
                for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
                    importlib.import_module(f"{self.package}.{module}")  # each registers itself
        return dict(sorted(self.registered.items()))

    def get(self, name: str):
        """The plugin registered as ``name``; a one-line ``ConfigError`` naming the choices."""
        registered = self.all()
        if name not in registered:
            raise ConfigError(f"{self.kind} '{name}' is unknown; choose one of: "
                              f"{', '.join(registered)}")
        return registered[name]


_METHODS = Plugins("strategy", STRATEGY_PACKAGE, scan=False)  # its __init__ imports each method


def register_strategy(name: str, server: type, settings: type | None = None,
                      client: type | None = None) -> Method:
    """Register a method under ``name`` (lower-case letters and digits, not taken yet)."""
    known = _METHODS.registered.get(name)
    if known is not None and known.server is server:
        return known  # its module imported twice (e.g. under another name): nothing new
    method = Method(name, server, settings, client)
    _METHODS.add(name, method)
    server.name = name
    server.settings_class = settings  # the type of its ``settings`` argument
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name, in alphabetical order."""
    return _METHODS.all()


def default_strategy() -> str:
    """The method ``python -m fedlora.simulate`` runs without ``strategy=`` (the strategies
    package names it, so generic code never does)."""
    methods()
    return importlib.import_module(STRATEGY_PACKAGE).DEFAULT_STRATEGY


def get_method(name: str) -> Method:
    """The method registered as ``name``; a one-line ``ConfigError`` naming the choices if none."""
    return _METHODS.get(name)
