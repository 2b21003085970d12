"""Nothing unaccounted leaves a DP client: every message of a DP federation (describe, Fed-SB's
set-up, train) is inspected, and anything beyond the noised update, n_k, the accounting and
the process bookkeeping fails the test. Then the server's side: in simulation it computes the
label histograms the clients no longer send (the oracle: the histograms the same clients send
without DP), results rows have ``train_loss: null``, and privacy.json and summary.json name
the noise mode; in deployment a participation model that needs histograms is refused."""

from __future__ import annotations

import json

import pytest

from fedlora.model.adapters import part_of
from fedlora.config import check_deployment
from fedlora.tasks.classification import load_dataset
from fedlora.core.errors import ConfigError
from fedlora.run.server import run_server
from tests.dp_round_trip import DPFederation, dp_config

ACCOUNTING = {"dp-noise-multiplier", "dp-sample-rate", "dp-delta", "dp-epsilon", "dp-sigmas",
              "dp-rates", "dp-steps", "dp-release-kinds", "dp-release-rounds",
              "dp-release-sigmas", "dp-release-rates", "dp-release-steps", "dp-declined"}
PUBLIC = {"num-examples"}  # n_k, documented public metadata (sample-size weighting)
BOOKKEEPING = {"partition-id", "pid", "model-builds"}  # the node's id, its process' diagnostics


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("strategy", ["fedsb", "fedavg"])
def test_a_dp_client_sends_only_its_noised_update_n_k_and_its_accounting(strategy):
    # Prepare
    federation = DPFederation(dp_config(strategy))

    # Execute: describe, then the method's set-up (Fed-SB) and two rounds
    federation.describe()
    federation.run()

    # Assert: every reply of every kind, record by record
    kinds = {kind for kind, _ in federation.replies}
    assert kinds == ({"query.describe", "train.setup", "train"} if strategy == "fedsb"
                     else {"query.describe", "train"})
    head_keys = federation.bundle.head_keys
    trained = set(federation.server.trained_parts)
    for kind, reply in federation.replies:
        assert not reply.has_error(), reply.error
        content = reply.content
        assert not content.config_records, kind
        assert set(content.metric_records) == {"metrics"}, kind
        metrics = set(content["metrics"])
        assert metrics <= ACCOUNTING | PUBLIC | BOOKKEEPING, (kind, metrics - ACCOUNTING - PUBLIC
                                                              - BOOKKEEPING)
        assert "train_loss" not in metrics and "label-histogram" not in metrics
        if kind == "query.describe":  # who it is and n_k, no data
            assert not content.array_records and metrics == {"partition-id", "num-examples"}
            continue
        assert metrics >= ACCOUNTING - {"dp-declined"}, kind  # every reply accounts for itself
        assert set(content.array_records) == {"arrays"}, kind
        arrays = content["arrays"].to_torch_state_dict()
        if kind == "train":  # the noised trained parts, nothing else
            assert {part_of(k, head_keys) for k in arrays} == trained
        else:  # Fed-SB's noised init gradient: one per adapted base weight
            assert sorted(arrays) == sorted(f"{n}.base.weight" for n in federation.bundle.adapted)


class HandlerGrid:
    """A grid whose nodes are a DPFederation's real ClientApp handlers."""

    def __init__(self, federation: DPFederation):
        self.federation = federation

    def get_node_ids(self):
        return list(self.federation.contexts)

    def send_and_receive(self, messages, timeout=None):
        return self.federation(0, list(messages))


@pytest.mark.usefixtures("flower_task")
def test_the_simulation_server_counts_labels_itself_and_reports_no_train_loss(tmp_path):
    # Prepare: markov participation needs the histograms; the oracle is the clients' own
    # describe replies without DP
    cfg = dp_config("fedavg", rounds=1, participation={"name": "markov", "mean_p": 0.9})
    plain = DPFederation(dp_config("fedavg", dp={"epsilon": None}))
    expected = {int(r.content["metrics"]["partition-id"]): list(r.content["metrics"]["label-histogram"])
                for r in plain.describe()}
    federation = DPFederation(cfg)
    data = load_dataset(cfg.data)

    # Execute
    summary = run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle, data,
                         owns_partitions=True)

    # Assert
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert {p["partition_id"]: p["label_histogram"] for p in partitions} == expected
    assert all("label-histogram" not in r.content["metrics"] for k, r in federation.replies
               if k == "query.describe")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["clients_trained"] > 0
    assert all(row["train_loss"] is None for row in rows)
    privacy_report = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy_report["noise"] == summary["noise"] == "reproducible"


@pytest.mark.usefixtures("flower_task")
def test_a_deployment_server_has_no_histograms_under_dp_and_names_secret_noise(tmp_path):
    # Prepare: a deployment (noise resolved as the ServerApp resolves it), uniform sampling
    cfg = dp_config("fedavg", deployment=True, rounds=1)
    federation = DPFederation(cfg)

    # Execute
    summary = run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle,
                         load_dataset(cfg.data))

    # Assert
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert all(p["label_histogram"] is None and p["num_examples"] > 0 for p in partitions)
    assert json.loads((tmp_path / "privacy.json").read_text())["noise"] == "secret"
    assert summary["noise"] == "secret"


@pytest.mark.parametrize("participation", ["bernoulli", "markov", "cyclic"])
def test_deployment_refuses_histogram_participation_under_dp(participation):
    # Prepare
    cfg = dp_config("fedavg", deployment=True, participation={"name": participation})

    # Execute / Assert: one line naming the key and the fix
    with pytest.raises(ConfigError) as error:
        check_deployment(cfg)
    assert str(error.value) == (f"participation={participation} needs each client's label "
                                "histogram, which DP clients do not send on real SuperNodes; use "
                                "participation=uniform or drop dp.epsilon")
    check_deployment(dp_config("fedavg", deployment=True))  # uniform: fine
    check_deployment(dp_config("fedavg", deployment=True, participation={"name": participation},
                               dp={"epsilon": None}))  # no DP: the clients send them
