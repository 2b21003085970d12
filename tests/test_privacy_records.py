"""Every release on record (fedlora.privacy.accounting's release log and ``privacy.json`` layout):
epsilon is recomputed from the written JSON alone by Google's ``dp_accounting``, an
accountant independent of Opacus: RDP (same orders) for fedlora's ``rdp`` accountant, PLD
for its ``prv`` accountant."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedlora.privacy import accounting as privacy

DELTA = 1e-5


def fedsb_log(sigma: float, init_rate: float, rate: float, rounds: list[int], steps: int):
    """A Fed-SB client: its init release (one step at the init rate), then training rounds."""
    releases = privacy.add_release([], "init", 0, sigma, init_rate, 1)
    for server_round in rounds:
        releases = privacy.add_release(releases, "train", server_round, sigma, rate, steps)
    return releases


def fedit_log(sigma: float, rate: float, rounds: list[int], steps: int):
    releases = []
    for server_round in rounds:
        releases = privacy.add_release(releases, "train", server_round, sigma, rate, steps)
    return releases


def gaussian_events(releases):
    for release in releases:
        gaussian = dp_accounting.GaussianDpEvent(release["noise_multiplier"])
        sampled = (gaussian if release["sample_rate"] >= 1.0
                   else dp_accounting.PoissonSampledDpEvent(release["sample_rate"], gaussian))
        yield dp_accounting.SelfComposedDpEvent(sampled, release["steps"])


def rdp_epsilon(releases, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(orders=privacy.RDP_ORDERS)
    for event in gaussian_events(releases):
        accountant.compose(event)
    return accountant.get_epsilon(delta)


def pld_epsilon(releases, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for event in gaussian_events(releases):
        accountant.compose(event)
    return accountant.get_epsilon(delta)


def client_metrics(releases, delta: float, accountant: str) -> dict:
    """What a client's reply would carry (``ClientPrivacy.metrics`` plus the release log)."""
    history = privacy.history_from_releases(releases)
    return {"dp-noise-multiplier": releases[-1]["noise_multiplier"],
            "dp-sample-rate": releases[-1]["sample_rate"], "dp-delta": delta,
            "dp-epsilon": privacy.epsilon_spent(history, delta, accountant),
            **privacy.history_to_record(history), **privacy.releases_to_record(releases)}


def test_release_log_keeps_each_release_and_merges_only_consecutive_equal_mechanisms():
    # Prepare: init at 0.32, two training rounds at 0.08, then (say) a new sigma
    releases = fedsb_log(1.5, 0.32, 0.08, [1, 3], 8)
    releases = privacy.add_release(releases, "train", 4, 2.0, 0.08, 8)

    # Execute
    history = privacy.history_from_releases(releases)

    # Assert
    assert [r["kind"] for r in releases] == ["init", "train", "train", "train"]
    assert [r["round"] for r in releases] == [0, 1, 3, 4]
    assert history == [(1.5, 0.32, 1), (1.5, 0.08, 16), (2.0, 0.08, 8)]
    assert privacy.release_steps(releases) == privacy.total_steps(history) == 25


def test_a_release_of_no_steps_is_not_recorded_and_bad_kinds_are_refused():
    assert privacy.add_release([], "train", 1, 1.0, 0.1, 0) == []
    with pytest.raises(ValueError, match="release kind must be one of"):
        privacy.add_release([], "warmup", 1, 1.0, 0.1, 1)


@pytest.mark.parametrize("record_type", [MetricRecord, ConfigRecord])
def test_release_log_travels_in_flower_records(record_type):
    # Prepare
    releases = fedsb_log(1.25, 0.5, 0.1, [2, 5], 4)

    # Execute
    record = record_type(privacy.releases_to_record(releases, prefix="dp-known-release-"))
    back = privacy.releases_from_record(record, prefix="dp-known-release-")

    # Assert
    assert back == releases
    assert privacy.releases_from_record(record_type({})) is None


@pytest.mark.parametrize("accountant,oracle", [("rdp", rdp_epsilon), ("prv", pld_epsilon)])
def test_privacy_json_alone_recomputes_every_epsilon_with_dp_accounting(tmp_path, accountant,
                                                                         oracle):
    # Prepare: a Fed-SB client (init at q_init = 64/200, then rounds at q = 16/200) and a
    # FedIT client (q = 16/160), noise planned for epsilon 3 each
    sigma_fedsb = privacy.plan_noise_multiplier(3.0, DELTA, 0.08, 40, "rdp", init_rate=0.32)
    sigma_fedit = privacy.plan_noise_multiplier(3.0, DELTA, 0.1, 40, "rdp")
    logs = {4: fedsb_log(sigma_fedsb, 0.32, 0.08, [1, 2, 4, 7], 8),
            9: fedit_log(sigma_fedit, 0.1, [1, 3, 6], 8)}
    ledger = privacy.PrivacyLedger(3.0, accountant, noise="secret", mode="record")
    for partition, releases in logs.items():
        ledger.record(partition, MetricRecord(client_metrics(releases, DELTA, accountant)))
    path = tmp_path / "privacy.json"

    # Execute
    path.write_text(json.dumps(ledger.report()))
    report = json.loads(path.read_text())

    # Assert: the run-level layout, then every client's epsilon from the JSON alone
    assert {k: report[k] for k in ("noise", "mode", "target_epsilon", "accountant")} == {
        "noise": "secret", "mode": "record", "target_epsilon": 3.0, "accountant": accountant}
    assert report["max_epsilon"] == max(c["epsilon"] for c in report["clients"].values())
    assert report["declined"] == []
    assert report["clients"]["4"]["releases"][0]["kind"] == "init"
    assert "sample_rate" not in report["clients"]["4"]  # one flat rate cannot recompute it
    for partition, client in report["clients"].items():
        assert set(client) >= {"releases", "accountant", "delta", "epsilon", "noise_multiplier"}
        assert client["steps"] == sum(r["steps"] for r in client["releases"])
        independent = oracle(client["releases"], client["delta"])
        assert 0 < client["epsilon"] <= 3.0 * (1 + 1e-9)
        assert abs(client["epsilon"] - independent) <= 0.01 * independent, (partition, independent)
        assert privacy.epsilon_from_report_entry(client) == pytest.approx(client["epsilon"])


def test_flat_fields_would_have_undercounted_a_fedsb_client():
    # Prepare: the audit's case, a Fed-SB client whose init costs most of its budget
    releases = fedsb_log(2.0, 1.0, 0.08, [1, 2], 8)
    history = privacy.history_from_releases(releases)

    # Execute
    from_log = privacy.epsilon_spent(history, DELTA, "rdp")
    from_flat = privacy.epsilon_spent([(2.0, 0.08, privacy.total_steps(history))], DELTA, "rdp")

    # Assert: the log's epsilon is the independent one; the flat fields' is far lower
    assert from_log == pytest.approx(rdp_epsilon(releases, DELTA), rel=0.01)
    assert from_flat < 0.5 * from_log


def test_ledger_with_release_logs_round_trips_and_hands_the_log_back():
    # Prepare
    releases = fedsb_log(2.0, 0.5, 0.1, [1], 4)
    ledger = privacy.PrivacyLedger(3.0, "rdp", noise="secret")
    ledger.record(2, client_metrics(releases, DELTA, "rdp"))
    ledger.record(2, client_metrics(releases[:1], DELTA, "rdp"))  # stale: must not undercount
    restored = privacy.PrivacyLedger(3.0, "rdp", noise="secret")

    # Execute
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    config = restored.config_for(2)

    # Assert
    assert restored.clients == ledger.clients
    assert privacy.releases_from_record(config, prefix="dp-known-release-") == releases
    assert privacy.history_from_record(config, prefix="dp-known-") == privacy.history_from_releases(releases)


def test_ledger_refuses_an_unknown_noise_source():
    with pytest.raises(ValueError, match="noise must be one of"):
        privacy.PrivacyLedger(3.0, "rdp", noise="seeded")
