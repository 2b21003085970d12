"""A node's own DP policy (``fedlora.clients.policy``): the node, not the server, decides.

The policy table is checked against hand-worked cases; then through the real ClientApp
handlers on the embedded model: a run below a node's policy gets one error reply naming the
key and nothing else (no label histogram, no update, nothing spent), whichever handler it
reaches; the node plans its own noise multiplier and ignores one the server sends; and the
server stops such a run with one line, which the deployment's ServerApp logs once and leaves
in ``error.txt`` for the launcher."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.clients import app as client_app
from fedlora.clients.dp import STATE_KEY
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE
from fedlora.clients.policy import NodePolicy, PolicyError, refusal
from fedlora.config import client_config
from fedlora.core.errors import ConfigError
from fedlora.model.adapters import part_of
from fedlora.privacy import accounting
from fedlora.report.results import RUN_ERROR
from fedlora.run import server as server_module
from fedlora.run.server import run_server
from fedlora.strategies import get_strategy
from fedlora.tasks.classification import load_dataset
from tests.dp_round_trip import CLIENTS, NUM_LABELS, DPFederation, dp_config
from tests.test_dp_messages import HandlerGrid

RUN = {"dp-epsilon": 3.0, "dp-delta": 1e-5, "dp-noise": "secret"}  # a run's DP settings
NO_DP = {"dp-epsilon": 0.0}


# --------------------------------------------------------------------------------------------
# The policy table


@pytest.mark.parametrize("node, run, num_examples, expected", [
    # no policy: every run is followed, as before (simulation's nodes)
    ({}, NO_DP, 300, None),
    ({}, {**RUN, "dp-noise": "reproducible"}, 300, None),
    # DP required: no DP (or client-level DP, which sends dp-epsilon 0) is refused
    ({"dp-required": True}, NO_DP, 300,
     "node policy dp-required=true refuses a run without DP-SGD on this node (dp.epsilon unset, "
     "or dp.mode=client); set dp.epsilon"),
    ({"dp-required": True}, RUN, 300, None),
    # an epsilon cap: more is refused, as much or less is followed; it implies DP
    ({"dp-max-epsilon": 1}, RUN, 300, "node policy dp-max-epsilon=1 refuses dp.epsilon=3; set "
                                      "dp.epsilon <= 1"),
    ({"dp-max-epsilon": 3}, RUN, 300, None),
    ({"dp-max-epsilon": 8.5}, NO_DP, 300,
     "node policy dp-max-epsilon=8.5 refuses a run without DP-SGD on this node (dp.epsilon "
     "unset, or dp.mode=client); set dp.epsilon"),
    # a delta cap on delta_k = min(dp.delta, 1/n_k): n_k = 300 gives 1/300 > 1e-3
    ({"dp-delta": 1e-6}, RUN, 300, "node policy dp-delta=1e-06 refuses dp.delta=1e-05; set "
                                   "dp.delta <= 1e-06"),
    ({"dp-delta": 1e-3}, {**RUN, "dp-delta": 0.01}, 300,
     "node policy dp-delta=0.001 refuses dp.delta=0.01; set dp.delta <= 0.001"),
    ({"dp-delta": 1e-3}, {**RUN, "dp-delta": 0.01}, 2000, None),  # delta_k = 1/2000 <= 1e-3
    ({"dp-delta": 1e-6}, NO_DP, 300, None),  # a delta cap alone does not require DP
    # reproducible noise: refused by a node that requires DP unless it says otherwise
    ({"dp-required": True}, {**RUN, "dp-noise": "reproducible"}, 300,
     "node policy dp-secret-noise-only=true (implied by requiring DP) refuses "
     "dp.reproducible_noise=true (noise the server can replay and remove); drop "
     "dp.reproducible_noise"),
    ({"dp-required": True, "dp-secret-noise-only": False}, {**RUN, "dp-noise": "reproducible"},
     300, None),
    ({"dp-secret-noise-only": "true"}, {**RUN, "dp-noise": "reproducible"}, 300,
     "node policy dp-secret-noise-only=true refuses dp.reproducible_noise=true (noise the "
     "server can replay and remove); drop dp.reproducible_noise"),
    ({"dp-secret-noise-only": True}, NO_DP, 300, None),
])
def test_the_policy_refuses_exactly_the_runs_below_it(node, run, num_examples, expected):
    assert refusal({"partition-id": 0, "num-partitions": 2, **node}, run, num_examples) == expected


@pytest.mark.parametrize("node, message", [
    ({"dp-max-epsilon": "lots"}, "node config dp-max-epsilon='lots' must be a positive finite number"),
    ({"dp-max-epsilon": 0}, "node config dp-max-epsilon=0 must be a positive finite number"),
    ({"dp-max-epsilon": True}, "node config dp-max-epsilon=True must be a positive finite number"),
    ({"dp-delta": 1}, "node config dp-delta=1 must be a number in (0, 1)"),
    ({"dp-required": 1}, "node config dp-required=1 must be true or false"),
    ({"dp-max-eps": 1}, "node config key dp-max-eps is unknown; the policy keys are dp-required, "
                        "dp-max-epsilon, dp-delta, dp-secret-noise-only"),
])
def test_a_bad_policy_refuses_every_run(node, message):
    # Execute / Assert: the value is named; even a run the policy would surely accept is refused
    with pytest.raises(PolicyError) as error:
        NodePolicy.from_node_config(node)
    assert str(error.value) == message
    assert refusal(node, {**RUN, "dp-epsilon": 0.1}, 300) == (
        f"node policy: {message}; fix the SuperNode's --node-config")


# --------------------------------------------------------------------------------------------
# Through the ClientApp's handlers


def node_context(partition: int, **policy) -> Context:
    return Context(run_id=1, node_id=10 + partition, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": CLIENTS, **policy})


def message_to(cfg, bundle, message_type: str, partition: int, **extra) -> Message:
    """The server's message of ``message_type`` to ``partition`` in round 1 (a train message
    as the method's strategy builds it), its config with ``extra`` added."""
    config = {**client_config(cfg, NUM_LABELS), **extra}
    if message_type == "train":
        server = get_strategy(cfg.strategy).from_config(cfg, bundle.head_keys)
        server.register_nodes({10 + p: p for p in range(CLIENTS)})
        messages = server.configure_train(1, ArrayRecord(bundle.initial_state),
                                          ConfigRecord(config), None)
        return next(m for m in messages if m.metadata.dst_node_id == 10 + partition)
    content = {"config": ConfigRecord({**config, "server-round": 0})}
    if message_type == SETUP_MESSAGE_TYPE:  # the global head, as Fed-SB's server sends it
        content["arrays"] = ArrayRecord({k: v for k, v in bundle.initial_state.items()
                                         if part_of(k, bundle.head_keys) == "head"})
    return Message(content=RecordDict(content), dst_node_id=10 + partition,
                   message_type=message_type)


def assert_refused(reply: Message, reason: str, context: Context) -> None:
    """One error reply with ``reason``, nothing else, and nothing spent or drawn on the node."""
    assert reply.has_error() and reply.error.reason == reason
    assert not reply.has_content()
    assert not context.state.config_records and not context.state.array_records  # no secret,
    assert STATE_KEY not in context.state.config_records  # no accountant, no kept tensors


@pytest.mark.usefixtures("flower_task")
def test_a_node_that_requires_dp_sends_no_label_histogram_to_a_run_without_dp():
    # Prepare: a run without DP, whose describe would carry the histogram
    cfg = dp_config("fedavg", deployment=True, dp={"epsilon": None})
    bundle = DPFederation(cfg).bundle
    message = message_to(cfg, bundle, "query.describe", 1)
    assert "label-histogram" in client_app.describe(message, node_context(1)).content["metrics"]
    context = node_context(1, **{"dp-required": True})

    # Execute
    reply = client_app.describe(message, context)

    # Assert
    assert_refused(reply, "node policy dp-required=true refuses a run without DP-SGD on this "
                          "node (dp.epsilon unset, or dp.mode=client); set dp.epsilon "
                          "(partition 1)", context)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("message_type", ["train", SETUP_MESSAGE_TYPE])
def test_a_run_above_the_nodes_epsilon_gets_one_error_and_no_update(message_type):
    # Prepare: dp.epsilon=3 (Fed-SB: it has a set-up release too) to a node capped at 1
    cfg = dp_config("fedsb", deployment=True, clients_per_round=CLIENTS)
    bundle = DPFederation(cfg).bundle
    extra = {"init-samples": 8} if message_type == SETUP_MESSAGE_TYPE else {}
    message = message_to(cfg, bundle, message_type, 2, **extra)
    handler = client_app.train if message_type == "train" else client_app.setup
    context = node_context(2, **{"dp-max-epsilon": 1})

    # Execute
    reply = handler(message, context)

    # Assert
    assert_refused(reply, "node policy dp-max-epsilon=1 refuses dp.epsilon=3; set dp.epsilon "
                          "<= 1 (partition 2)", context)


@pytest.mark.usefixtures("flower_task")
def test_a_run_cannot_switch_a_dp_node_to_reproducible_noise():
    # Prepare: simulation's noise (reproducible) to a node that requires DP
    cfg = dp_config("fedavg", deployment=False, clients_per_round=CLIENTS)
    assert cfg.dp.noise == "reproducible"
    bundle = DPFederation(cfg).bundle
    message = message_to(cfg, bundle, "train", 0)
    refusing = node_context(0, **{"dp-required": True, "dp-max-epsilon": 8})
    consenting = node_context(0, **{"dp-required": True, "dp-secret-noise-only": False})

    # Execute
    refused = client_app.train(message, refusing)
    served = client_app.train(message, consenting)

    # Assert: refused unless the node itself allows it
    assert_refused(refused, "node policy dp-secret-noise-only=true (implied by requiring DP) "
                            "refuses dp.reproducible_noise=true (noise the server can replay "
                            "and remove); drop dp.reproducible_noise (partition 0)", refusing)
    assert not served.has_error() and served.content["arrays"]


@pytest.mark.usefixtures("flower_task")
def test_the_node_plans_its_own_noise_multiplier_and_ignores_the_servers():
    # Prepare: a first-contact train message carrying a tiny sigma "from the server"
    cfg = dp_config("fedavg", deployment=True, clients_per_round=CLIENTS)
    bundle = DPFederation(cfg).bundle
    message = message_to(cfg, bundle, "train", 3, **{"dp-known-noise-multiplier": 0.05})
    context = node_context(3)
    n_k = len(client_app.ClientSetup(message, context).indices)
    # The oracle: the plan from the node's own n_k, batch size and local_steps x rounds
    delta_k = min(cfg.dp.delta, 1 / n_k)
    rate = min(1.0, cfg.batch_size / n_k)
    planned = accounting.plan_noise_multiplier(cfg.dp.epsilon, delta_k, rate,
                                               cfg.local_steps * cfg.rounds, cfg.dp.accountant)

    # Execute
    reply = client_app.train(message, context)

    # Assert: the node's plan, which keeps its whole run within the target; never the 0.05
    sigma = float(reply.content["metrics"]["dp-noise-multiplier"])
    assert sigma == planned and sigma > 0.05
    whole_run = accounting.planned_history(sigma, rate, cfg.local_steps * cfg.rounds)
    assert accounting.epsilon_spent(whole_run, delta_k, cfg.dp.accountant) <= cfg.dp.epsilon
    assert float(context.state[STATE_KEY]["dp-noise-multiplier"]) == sigma


def test_the_server_no_longer_sends_a_noise_multiplier():
    ledger = accounting.PrivacyLedger(3.0, "rdp", noise="secret")
    ledger.record(2, {"dp-noise-multiplier": 1.5, "dp-sample-rate": 0.1, "dp-delta": 1e-5,
                      "dp-epsilon": 0.4, **accounting.history_to_record([(1.5, 0.1, 4)])})
    sent = ledger.config_for(2)
    assert "dp-known-noise-multiplier" not in sent and sent["dp-known-steps"] == [4]


# --------------------------------------------------------------------------------------------
# The server's side


@pytest.mark.usefixtures("flower_task")
def test_the_server_stops_a_refused_run_with_one_line(tmp_path):
    # Prepare: a deployment at dp.epsilon=3 where the node of partition 2 is capped at 1
    cfg = dp_config("fedavg", deployment=True, rounds=1)
    federation = DPFederation(cfg)
    federation.contexts[12].node_config["dp-max-epsilon"] = 1

    # Execute
    with pytest.raises(ConfigError) as error:
        run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle, load_dataset(cfg.data))

    # Assert: one line naming the key; no node got anything but the describe query
    assert str(error.value) == ("1 of 4 nodes refuse the run: node policy dp-max-epsilon=1 "
                                "refuses dp.epsilon=3; set dp.epsilon <= 1 (partition 2)")
    assert "\n" not in str(error.value)
    assert {kind for kind, _ in federation.sent} == {"query.describe"}
    assert not (tmp_path / "results.jsonl").is_file() or not (tmp_path / "results.jsonl").read_text()


def test_the_serverapp_logs_a_refusal_once_and_leaves_it_for_the_launcher(tmp_path, monkeypatch,
                                                                         caplog):
    # Prepare: the run loop stops as a refused run does; no model is built
    line = "1 of 3 nodes refuse the run: node policy dp-max-epsilon=1 refuses dp.epsilon=3"

    def refused_run(*args, **kwargs):
        raise ConfigError(line)

    monkeypatch.setattr(server_module, "prepare", lambda cfg: (None, None))
    monkeypatch.setattr(server_module, "run_server", refused_run)
    monkeypatch.setattr("fedlora.run.cli.setup_logging", lambda out, quiet: None)
    context = Context(run_id=1, node_id=0, state=RecordDict(), node_config={},
                      run_config={"out": str(tmp_path), "dp.epsilon": 3.0})

    # Execute: no exception, so Flower prints no traceback
    with caplog.at_level(logging.INFO, logger="fedlora"):
        server_module.main(None, context)

    # Assert
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [line]
    assert (tmp_path / RUN_ERROR).read_text() == line + "\n"
    assert not (tmp_path / "summary.json").exists()
