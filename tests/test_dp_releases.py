"""Every release on record, for every registered method: a DP federation of the real server
strategy and the real ClientApp handlers writes a privacy report from which Google's
``dp_accounting`` (an accountant independent of Opacus: RDP at the same orders, PLD for
fedlora's ``prv``) recomputes every client's epsilon within 1 %."""

from __future__ import annotations

import json

import pytest

from fedlora.strategies import STRATEGIES
from tests.dp_round_trip import DPFederation, dp_config
from tests.test_privacy_records import pld_epsilon, rdp_epsilon

CASES = [(name, "rdp") for name in sorted(STRATEGIES)] + [("fedsb", "prv")]


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("strategy,accountant", CASES)
def test_privacy_json_alone_recomputes_every_clients_epsilon(tmp_path, strategy, accountant):
    # Prepare
    # (Fed-SB's init share, 16 / 2 clients, is twice the batch: its own sampling rate;
    # HetLoRA's rank-pruning term is refused under record-level DP, so it runs without)
    federation = DPFederation(dp_config(strategy, dp={"accountant": accountant},
                                        fedsb={"init_samples": 16}, hetlora={"prune": False}))
    path = tmp_path / "privacy.json"

    # Execute: the method's initialisation and two rounds, then the report as a file
    federation.run()
    path.write_text(json.dumps(federation.server.privacy.report()))
    report = json.loads(path.read_text())

    # Assert: every client that released anything has a complete log, consistent with its
    # flat fields, and dp_accounting recomputes its epsilon from the file alone
    oracle = rdp_epsilon if accountant == "rdp" else pld_epsilon
    trained = {int(m.metadata.dst_node_id) - 10 for kind, m in federation.sent if kind == "train"}
    assert set(map(int, report["clients"])) >= trained and trained
    assert report["accountant"] == accountant and report["noise"] == "reproducible"
    for partition, client in report["clients"].items():
        releases = client["releases"]
        received = [(kind, int(m.content["config"]["server-round"]))
                    for kind, m in federation.sent if m.metadata.dst_node_id == 10 + int(partition)]
        assert [(r["kind"], r["round"]) for r in releases] == [
            ("init" if kind == "train.setup" else "train", rnd) for kind, rnd in received]
        assert client["steps"] == sum(r["steps"] for r in releases)
        assert all(r["noise_multiplier"] == client["noise_multiplier"] for r in releases)
        assert all(r["steps"] == federation.cfg.local_steps for r in releases if r["kind"] == "train")
        independent = oracle(releases, client["delta"])
        assert 0 < client["epsilon"] <= 3.0 * (1 + 1e-9)
        assert abs(client["epsilon"] - independent) <= 0.01 * independent, (partition, independent)
    if strategy == "fedsb":  # its init release is on record, at its own rate
        inits = [c["releases"] for c in report["clients"].values() if c["releases"][0]["kind"] == "init"]
        assert inits and all(log[0]["round"] == 0 and log[0]["steps"] == 1 for log in inits)
        assert all(log[0]["sample_rate"] == 2 * log[-1]["sample_rate"] for log in inits if len(log) > 1)
