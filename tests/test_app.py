"""The package is a valid Flower App: pyproject's components import as a ServerApp/ClientApp,
and the ServerApp reads the same keys from Flower's run config as the simulate command."""

import importlib
import tomllib
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flwr.common.config import flatten_dict

from fedlora.config import RunConfig, hydra_tree
from fedlora.core.settings import run_config_values
from fedlora.run.server import config_from_run_config

ROOT = Path(__file__).parents[1]


def load(reference: str):
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)


def test_pyproject_components_are_flower_apps():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert isinstance(load(flwr["components"]["serverapp"]), ServerApp)
    assert isinstance(load(flwr["components"]["clientapp"]), ClientApp)
    # The default run config of the app is a valid fedlora config: the simulate defaults.
    cfg, _ = config_from_run_config(flwr["config"])
    assert cfg == RunConfig.from_dict({})


def test_pyproject_run_config_lists_exactly_the_generated_keys_without_defaults():
    # Prepare: Flower only accepts --run-config keys that pyproject declares
    table = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])

    # Assert: every key of the command line (methods' sections included), and no default
    # written twice (each lives in its settings dataclass)
    assert set(table) == set(flatten_dict(run_config_values(hydra_tree())))
    assert set(table.values()) == {""}


def test_run_config_keys_are_the_simulate_keys():
    cfg, out = config_from_run_config({"strategy": "fedavg", "rounds": 3, "data.path": "",
                                       "partition.name": "dirichlet", "partition.alpha": 0.1,
                                       "fedsb.init_samples": 64, "out": "/tmp/x"})
    assert (cfg.strategy, cfg.rounds, cfg.partition.name, cfg.partition.alpha) == ("fedavg", 3, "dirichlet", 0.1)
    assert cfg.data.path is None and cfg.methods["fedsb"].init_samples == 64 and str(out) == "/tmp/x"
