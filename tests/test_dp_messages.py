"""Nothing unaccounted leaves a DP client: every message of a DP federation (describe, Fed-SB's
set-up, train) is inspected, and anything beyond the noised update, n_k, the accounting and
the process bookkeeping fails the test. Then the server's side, in both DP modes: no label
histogram in partitions.json (and none computed by the server), no client counts in the rows
or summary.json (nor bytes, nor the client sample, at client level), privacy.json and
summary.json name the noise mode; a participation model that needs histograms is refused."""

from __future__ import annotations

import json

import pytest

from fedlora.model.adapters import part_of
from fedlora.tasks.classification import load_dataset
from fedlora.core.errors import ConfigError
from fedlora.report.results import final_line
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
@pytest.mark.parametrize("mode", ["record", "client"])
def test_under_dp_no_label_histogram_leaves_a_client_and_no_client_count_is_written(mode, tmp_path):
    # Prepare: the real ClientApp handlers behind the real server loop, 2 rounds
    cfg = dp_config("fedavg", rounds=2, dp={"mode": mode})
    federation = DPFederation(cfg)

    # Execute
    summary = run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle,
                         load_dataset(cfg.data))

    # Assert: the describe replies carry who the client is and its size, nothing of its labels
    described = [r for kind, r in federation.replies if kind == "query.describe"]
    assert described and all(set(r.content["metrics"]) == {"partition-id", "num-examples"}
                             for r in described)
    # partitions.json: ids; sizes only where the accounting publishes them anyway (record)
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert [p["partition_id"] for p in partitions] == list(range(4))
    assert all(set(p) == ({"partition_id", "num_examples"} if mode == "record"
                          else {"partition_id"}) for p in partitions)
    # rows and summary: no loss, no client counts; at client level no bytes (count x size)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    counts = ["clients_trained", "clients_failed"]
    sizes = ["bytes_up", "bytes_down", "bytes_up_cum", "bytes_down_cum", "params_up_per_client"]
    for row in rows:
        assert row["train_loss"] is None and row["epsilon"] is not None
        assert all(row[key] is None for key in counts)
        if mode == "client":
            assert all(row[key] is None for key in sizes)
        else:
            assert row["bytes_up_cum"] is not None and row["bytes_down_cum"] is not None
    assert summary["clients_failed_total"] is None and summary["rounds_not_aggregated"] is None
    assert (summary["bytes_up_total"] is None) == (mode == "client")
    assert ("bytes up" in final_line(summary)) == (mode == "record")  # the line a run prints
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # the client sample: secret at client level, the server's public choice at record level
    assert (tmp_path / "participation.csv").is_file() == (mode == "record")
    if mode == "client":  # privacy.json: the mechanism of each release, nothing of the clients
        privacy_report = json.loads((tmp_path / "privacy.json").read_text())
        assert len(privacy_report["releases"]) == 2
        for release in privacy_report["releases"]:
            assert set(release) == {"kind", "round", "clip", "sample_rate", "noise_multiplier",
                                    "update_noise_multiplier", "count_noise_stddev",
                                    "count_sensitivity"}


@pytest.mark.usefixtures("flower_task")
def test_client_level_dp_can_publish_its_client_sample_when_asked(tmp_path):
    # Prepare
    cfg = dp_config("fedavg", rounds=1, dp={"mode": "client", "publish_participation": True})
    federation = DPFederation(cfg)

    # Execute
    run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle, load_dataset(cfg.data))

    # Assert: the matrix of the clients the strategy sampled, as without DP
    lines = (tmp_path / "participation.csv").read_text().splitlines()
    assert lines[0] == "round,c0,c1,c2,c3" and len(lines) == 2


@pytest.mark.usefixtures("flower_task")
def test_a_deployment_server_names_secret_noise(tmp_path):
    # Prepare: a deployment (noise resolved as the ServerApp resolves it), uniform sampling
    cfg = dp_config("fedavg", deployment=True, rounds=1)
    federation = DPFederation(cfg)

    # Execute
    summary = run_server(HandlerGrid(federation), cfg, tmp_path, federation.bundle,
                         load_dataset(cfg.data))

    # Assert
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert all("label_histogram" not in p and p["num_examples"] > 0 for p in partitions)
    assert json.loads((tmp_path / "privacy.json").read_text())["noise"] == "secret"
    assert summary["noise"] == "secret"


@pytest.mark.parametrize("mode", ["record", "client"])
@pytest.mark.parametrize("participation", ["bernoulli", "markov", "cyclic"])
def test_histogram_participation_is_refused_under_dp(participation, mode):
    # Execute / Assert: one line naming the key and the fix, in simulation and deployment
    for deployment in (False, True):
        with pytest.raises(ConfigError) as error:
            dp_config("fedavg", deployment=deployment, participation={"name": participation},
                      dp={"mode": mode})
        assert f"participation={participation}" in str(error.value)
        assert "participation=uniform" in str(error.value) and "\n" not in str(error.value)
    dp_config("fedavg", participation={"name": participation}, dp={"epsilon": None})  # no DP


@pytest.mark.parametrize("overrides,message", [
    ({"min_clients": 2, "dp": {"mode": "client"}}, "min_clients=2 with dp.mode=client"),
    ({"dp": {"publish_participation": True}}, "dp.publish_participation=true is for client-level DP"),
    ({"dp": {"epsilon": None, "mode": "client", "publish_participation": True}},
     "dp.publish_participation=true is for client-level DP"),
])
def test_settings_that_would_release_un_noised_counts_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        dp_config("fedavg", **overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
