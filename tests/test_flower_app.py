"""A fedlora strategy in any Flower app: ``FedSB(...)`` built from its own keyword arguments and
run with ``strategy.start(...)`` from a plain ``flwr.serverapp.ServerApp``, beside fedlora's
ClientApp, in a real Flower simulation (``flwr.simulation.run_simulation`` on Ray), without
fedlora's round loop (``fedlora.run.server``): the example of docs/flower-apps.md. The model is
the tiny random Llama of ``tests.test_generation_federation`` (2 blocks, rank 2 adapters on
q_proj and v_proj), the task its tiny SFT data."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.clients.app import app as client_app
from fedlora.config import RunConfig, client_config
from fedlora.core.errors import ConfigError
from fedlora.model.adapters import PARTS, factor_key
from fedlora.model.pretrained import build_model
from fedlora.strategies import FedIT, FedSB, FedSBSettings
from tests.test_generation_federation import ClientAppGrid, llama_folder, sft_data  # noqa: F401

CLIENTS, ROUNDS, RANK = 3, 2, 2


class PlainApp:
    """What a Flower user writes around ``FedSB``: the clients' settings (fedlora's ClientApp
    reads them from every message), the model's initial adapter state, a server-side
    evaluation, and a ServerApp whose main builds the strategy and calls ``start``."""

    def __init__(self, llama_folder, sft_data):  # noqa: F811
        self.cfg = RunConfig.from_dict({
            "task": "sft", "strategy": "fedsb", "model": str(llama_folder),
            "data": {"path": str(sft_data)}, "clients": CLIENTS, "rounds": ROUNDS, "rank": RANK,
            "local_steps": 2, "batch_size": 2, "max_length": 48,
            "eval": {"max_examples": 2, "max_new_tokens": 3}})
        data = self.cfg.task_spec().dataset()
        self.num_labels = len(data.label_names)
        self.model = build_model(self.cfg.model_spec(self.num_labels))
        self.initial = self.model.state(PARTS)
        self.score = self.cfg.task_spec().evaluator(self.model, data.test, self.cfg.max_length,
                                                    self.cfg.device)
        self.result, self.strategy = None, None
        self.server_app = ServerApp()
        self.server_app.main()(self.main)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load(arrays.to_torch_state_dict())
        return MetricRecord(self.score())

    def main(self, grid: Grid, context: Context | None = None) -> None:
        self.strategy = FedSB(clients=CLIENTS, rounds=ROUNDS, rank=RANK, alpha=self.cfg.alpha,
                              lr=3e-2, settings=FedSBSettings(init_samples=4))
        self.result = self.strategy.start(
            grid, ArrayRecord(self.initial),
            train_config=ConfigRecord(client_config(self.cfg, self.num_labels)),
            evaluate_fn=self.evaluate)

    def check_trained(self) -> None:
        """The nodes were found (one per partition), the set-up round ran without rejects,
        every round aggregated all clients with a finite loss, the server evaluated rounds
        0..2, and the final state holds every tensor, finite: B and A from the LoRA-SB
        initialisation (A's rows orthonormal, no longer the seeded init), R trained."""
        assert self.result is not None, "the ServerApp did not finish"
        result, strategy, initial = self.result, self.strategy, self.initial
        assert sorted(strategy.partition_of.values()) == list(range(CLIENTS))
        assert strategy.setup_rejected == []
        assert sorted(result.train_metrics_clientapp) == [1, 2]
        for metrics in result.train_metrics_clientapp.values():
            assert metrics["clients_trained"] == CLIENTS
            assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
        assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
        assert all(0 <= m["exact_match"] <= 1 and math.isfinite(m["eval_loss"])
                   for m in result.evaluate_metrics_serverapp.values())
        final = result.arrays.to_torch_state_dict()
        assert final.keys() == initial.keys()
        assert all(torch.isfinite(v).all() for v in final.values())
        for layer in self.model.adapted:
            A, R = final[factor_key(layer, "A")], final[factor_key(layer, "R")]
            assert not torch.equal(A, initial[factor_key(layer, "A")])
            torch.testing.assert_close(A @ A.T, torch.eye(RANK), atol=1e-4, rtol=0)
            assert not torch.equal(R, initial[factor_key(layer, "R")])


@pytest.mark.slow  # Ray's start alone takes ~10 s on 2 cores; the next test is its fast twin
def test_fedsb_trains_in_a_plain_flower_server_app_in_a_simulation(llama_folder, sft_data):  # noqa: F811
    from flwr.simulation import run_simulation

    # Prepare
    app = PlainApp(llama_folder, sft_data)

    # Execute: Flower's simulation engine, one virtual SuperNode per client
    run_simulation(server_app=app.server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"address": "local", "include_dashboard": False,
                                                 "log_to_driver": False}})

    # Assert
    app.check_trained()


@pytest.mark.usefixtures("flower_task")
def test_fedsb_trains_from_start_against_the_client_app_in_process(llama_folder, sft_data):  # noqa: F811
    # Prepare: the same app; nodes that answer with the ClientApp's own handlers in this
    # process, each with its own Context
    app = PlainApp(llama_folder, sft_data)
    grid = ClientAppGrid(CLIENTS)

    # Execute
    app.main(grid)

    # Assert: and the messages, in order: who is there, the set-up round, two train rounds
    app.check_trained()
    assert grid.message_types == (["query.describe"] * CLIENTS + ["train.setup"] * CLIENTS
                                  + ["train"] * CLIENTS * ROUNDS)


def test_from_config_and_keyword_arguments_build_the_same_strategy():
    # Prepare: a config with a value off its default in every group of arguments
    cfg = RunConfig.from_dict({"strategy": "fedsb", "clients": 6, "clients_per_round": 4,
                               "rounds": 5, "seed": 3, "rank": 4, "alpha": 2.0, "lr": 0.1,
                               "head_lr": 0.2, "lr_schedule": "constant", "weighting": "uniform",
                               "server_lr": 0.5, "min_clients": 2, "max_update_norm": 10.0,
                               "fedsb": {"init_samples": 12}})

    # Execute
    built = FedSB.from_config(cfg, {"head.weight"})
    by_hand = FedSB(clients=6, clients_per_round=4, rounds=5, seed=3, rank=4, alpha=2.0, lr=0.1,
                    head_lr=0.2, lr_schedule="constant", weighting="uniform", server_lr=0.5,
                    min_clients=2, max_update_norm=10.0, head_keys={"head.weight"},
                    settings=FedSBSettings(init_samples=12))

    # Assert: the same arguments, and the same seeded draws of clients
    names = ("clients", "clients_per_round", "rounds", "seed", "rank", "alpha", "lr", "head_lr",
             "lr_schedule", "server_lr", "min_clients", "max_update_norm", "head_keys", "settings")
    assert [getattr(built, n) for n in names] == [getattr(by_hand, n) for n in names]
    assert built.weighting.rule == by_hand.weighting.rule == "uniform"
    for strategy in (built, by_hand):
        strategy.register_nodes({10 + p: p for p in range(6)})
    assert [built.sample(r) for r in range(1, 6)] == [by_hand.sample(r) for r in range(1, 6)]


def test_a_handful_of_arguments_take_the_methods_defaults():
    # Execute
    strategy = FedSB(clients=4, rounds=3)

    # Assert: all clients per round, the method's rank, scale and lr, its settings' defaults
    assert (strategy.clients_per_round, strategy.rank, strategy.alpha, strategy.lr) == (
        4, FedSB.defaults["rank"], FedSB.defaults["alpha_per_rank"] * FedSB.defaults["rank"],
        FedSB.defaults["lr"])
    assert strategy.settings == FedSBSettings() and strategy.dp is None and strategy.client_dp is None


@pytest.mark.parametrize("arguments,message", [
    ({"clients": 0, "rounds": 2}, "clients=0 must be a positive integer; set clients >= 1"),
    ({"clients": 4, "rounds": 2, "clients_per_round": 5}, "clients_per_round=5 exceeds clients=4"),
    ({"clients": 4, "rounds": 2, "lr_schedule": "step"},
     "lr_schedule 'step' is unknown; choose one of: cosine, constant"),
    ({"clients": 4, "rounds": 2, "weighting": "fedau", "fedau_cutoff": 0},
     "fedau_cutoff=0 must be a positive integer"),
])
def test_bad_arguments_are_one_line_config_errors(arguments, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FedSB(**arguments)


def test_settings_of_another_method_are_refused():
    with pytest.raises(TypeError, match=r"FedIT takes settings=None, not FedSBSettings"):
        FedIT(clients=4, rounds=2, settings=FedSBSettings())
    with pytest.raises(TypeError, match=r"FedSB takes settings=FedSBSettings\(\.\.\.\)"):
        FedSB(clients=4, rounds=2, settings=object())


def test_start_refuses_a_number_of_rounds_the_strategy_was_not_built_for():
    # The learning-rate schedule and DP were planned for ``rounds``; nothing is sent
    with pytest.raises(ValueError, match=r"num_rounds=3 but the strategy was built with rounds=2"):
        FedSB(clients=2, rounds=2).start(None, ArrayRecord(), num_rounds=3)
