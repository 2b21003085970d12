"""Client-level DP (``dp.mode=client``) through every registered strategy, in process.

Oracles: the clipped-and-averaged update is recomputed here from the clients' own replies (a
Python loop, fixed denominator m = q N); the epsilon every round reports is recomputed from
privacy.json's history by Google's dp_accounting, and with adaptive clipping from its releases
alone, composing the update and count queries in dp_accounting with the count's sensitivity
measured here; Poisson client sampling is checked by its long-run rate.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from dp_accounting import dp_event, rdp

from fedlora.model.adapters import part_of
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.privacy.accounting import RDP_ORDERS
from fedlora.privacy.client_level import AdaptiveClip, client_level_dp
from fedlora.strategies import STRATEGIES
from tests.federation import CLIENTS, HEAD_KEYS, Federation, effective_weights

NAMES = sorted(STRATEGIES)
SVD_REFACTORISED = {"fedsvd", "flexlora"}  # their global B and A are re-derived by an SVD
pytestmark = pytest.mark.usefixtures("flower_task")  # Messages need a task identity


def client_dp_federation(name: str, **dp) -> Federation:
    fed = Federation(name, clients_per_round=2, rounds=8, weighting="uniform",
                     dp={"mode": "client", **dp})
    return fed


def dp_accounting_epsilon(history, delta: float) -> float:
    accountant = rdp.RdpAccountant(RDP_ORDERS)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(
            q, dp_event.GaussianDpEvent(sigma)), int(steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("name", NAMES)
def test_the_global_update_is_the_clipped_mean_with_a_fixed_denominator(name):
    # Prepare: noise negligible (sigma 1e-9), a clip that binds for some updates
    fed = client_dp_federation(name, noise_multiplier=1e-9, clip=0.3)
    trained_rounds = 0
    for _ in range(6):
        before, base_before = fed.state, fed.strategy.global_base_delta()
        messages = fed.configure()
        replies = fed.train(messages)
        trained = {part_of(k, HEAD_KEYS) for r in replies for k in r.content["arrays"]}

        # Execute
        fed.aggregate(replies)

        # Assert: x + sum_k clip(delta_k) / m for every trained tensor, m = q N = 2, as the
        # model computes it (a method may post-process the one pseudo-update: FedSVD's
        # re-factorisation keeps the product; LoRA-FAIR's correction and FedEx's residual
        # vanish for a single update; FLoRA merges it into the base weights, which hold the
        # earlier rounds' updates)
        if not replies:  # noise alone, of std 1e-9 C / m (the round still releases it): the
            # model the layers compute stays, and so does every tensor, except that a method
            # re-factorising the global by SVD re-derives B and A from B A + noise: before any
            # trained round (B = 0) that is the SVD of the noise, new factors of the same ~0
            # product. Poisson sampling draws from the OS, so which methods meet an empty round
            # varies from run to run
            reference = effective_weights(before, fed.W0, base_before)
            for layer, weight in fed.global_effective_weights().items():
                assert torch.allclose(weight, reference[layer], atol=1e-6), (name, layer)
            kept = [k for k in before
                    if name not in SVD_REFACTORISED or part_of(k, HEAD_KEYS) == "head"]
            assert all(torch.allclose(fed.state[k], before[k], atol=1e-6) for k in kept), name
            continue
        trained_rounds += 1
        updates = [r.content["arrays"].to_torch_state_dict() for r in replies]
        expected = dict(before)
        for key in updates[0]:
            total = torch.zeros_like(before[key])
            for update in updates:
                norm = math.sqrt(sum(float((u - before[k]).pow(2).sum()) for k, u in update.items()))
                total += (update[key] - before[key]) * min(1.0, 0.3 / norm)
            expected[key] = before[key] + total / 2
        reference = effective_weights(expected, fed.W0, base_before)
        for layer, weight in fed.global_effective_weights().items():
            assert torch.allclose(weight, reference[layer], atol=1e-6), (name, layer)
        for key in HEAD_KEYS:
            assert torch.allclose(fed.state[key], expected[key], atol=1e-7)
        assert trained and trained <= {"A", "B", "R", "head"}
    assert trained_rounds >= 3  # Poisson sampling left some rounds empty, not most


@pytest.mark.parametrize("name", NAMES)
def test_epsilon_grows_every_round_stays_within_target_and_is_recomputable(name, tmp_path):
    # Prepare
    fed = client_dp_federation(name, epsilon=3.0)
    epsilons = []

    # Execute: the run's 8 rounds (Poisson: some may be empty, they still count)
    for _ in range(8):
        fed.run_round()
        epsilons.append(fed.strategy.privacy.max_epsilon())
    report = json.loads(json.dumps(fed.strategy.privacy.report()))

    # Assert
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    assert epsilons[-1] <= 3.0 + 1e-9
    steps = sum(int(s) for _, _, s in report["history"])
    assert steps == 8  # one release per round, empty rounds included
    assert report["sample_rate"] == pytest.approx(2 / CLIENTS)
    assert report["noise"] == fed.cfg.dp.noise  # which seeding the run used, as summary.json
    independent = dp_accounting_epsilon(report["history"], report["delta"])
    assert independent == pytest.approx(report["epsilon"], rel=0.01)


def test_poisson_sampling_hits_the_planned_rate():
    # Prepare
    fed = client_dp_federation("fedavg", noise_multiplier=1.0)
    sampled = []

    # Execute
    for server_round in range(1, 401):
        sampled.append(len(fed.strategy.sample(server_round)))

    # Assert: Binomial(4, 1/2) per round: mean 2, and the count varies
    assert sum(sampled) / len(sampled) == pytest.approx(2.0, abs=0.15)
    assert len(set(sampled)) >= 3


def test_adaptive_clipping_moves_the_clip_toward_the_update_norms_and_survives_a_restart():
    # Prepare: updates of norm about 0.1 * sqrt(#params) >> the initial C
    fed = client_dp_federation("fedavg", noise_multiplier=0.5, clipping="adaptive", clip=0.01)
    start = fed.strategy.client_dp.clip

    # Execute
    for _ in range(8):
        fed.run_round()
    state = fed.strategy.state_dict()
    restored = client_dp_federation("fedavg", noise_multiplier=0.5, clipping="adaptive", clip=0.01)
    restored.strategy.load_state_dict(state)

    # Assert: every update was clipped, so C grew; the state carries C and the accountant
    assert fed.strategy.client_dp.clip > start
    assert restored.strategy.client_dp.clip == fed.strategy.client_dp.clip
    assert restored.strategy.privacy.max_epsilon() == fed.strategy.privacy.max_epsilon()


def count_query_sensitivity() -> float:
    """The most one client moves adaptive clipping's count query, measured: the noiseless
    release (sigma_b = 0, m = 1) with and without one more client, clipped or not."""
    count = AdaptiveClip(expected_clients=1.0, clip=1.0, clipped_count_stddev=0.0)
    others = [0.2, 3.0, 0.9, 5.0]
    without = count.unclipped_fraction(others, torch.Generator())
    return max(abs(count.unclipped_fraction(others + [norm], torch.Generator()) - without)
               for norm in (0.5, 2.0))  # one update left unclipped, one clipped


def independent_epsilon(report: dict, count_sensitivity: float) -> float:
    """epsilon from privacy.json's releases alone, by dp_accounting: per release one Poisson
    sample at its rate of the update query (Gaussian, noise multiplier sigma_delta) and, with
    adaptive clipping, the count query (Gaussian, noise std sigma_b over the sensitivity
    measured here, not the one recorded), composed as dp_accounting composes them."""
    accountant = rdp.RdpAccountant(RDP_ORDERS)
    for release in report["releases"]:
        queries = [dp_event.GaussianDpEvent(release["update_noise_multiplier"])]
        if release["count_noise_stddev"] is not None:
            queries.append(dp_event.GaussianDpEvent(release["count_noise_stddev"] / count_sensitivity))
        accountant.compose(dp_event.PoissonSampledDpEvent(release["sample_rate"],
                                                          dp_event.ComposedDpEvent(queries)))
    return accountant.get_epsilon(report["delta"])


def test_the_count_query_moves_by_one_half_per_client_as_privacy_json_records():
    # Andrew et al.'s noise split holds for a count that one client moves by 1/2 (bits
    # shifted by -1/2); unshifted bits in {0, 1} move it by 1
    assert count_query_sensitivity() == pytest.approx(0.5)


def test_adaptive_clipping_epsilon_matches_an_independent_composition_of_both_queries():
    # Prepare: the small federation, a Fed-SB-like set-up release, then 8 rounds at epsilon 3
    fed = client_dp_federation("fedavg", epsilon=3.0, clipping="adaptive", clip=0.05)
    fed.strategy.private_setup([{"w": torch.ones(3, dtype=torch.float64)}])

    # Execute
    for _ in range(8):
        fed.run_round()
    report = json.loads(json.dumps(fed.strategy.privacy.report()))

    # Assert: every training release names both queries, the set-up release only its sum
    kinds = [r["kind"] for r in report["releases"]]
    assert kinds == ["init"] + ["train"] * 8
    assert all(r["count_sensitivity"] == pytest.approx(count_query_sensitivity())
               for r in report["releases"][1:])
    assert report["releases"][0]["count_noise_stddev"] is None
    assert independent_epsilon(report, count_query_sensitivity()) == pytest.approx(
        report["epsilon"], rel=0.01)


def test_adaptive_clipping_at_the_readmes_setting_reports_the_epsilon_it_spends():
    # Prepare: 100 clients, 10 a round, 25 rounds, dp.epsilon=8, adaptive clipping (the
    # client-level sweep's setting), updates of norms around the clip
    cfg = RunConfig.from_dict({"strategy": "fedsvd", "clients": 100, "clients_per_round": 10,
                               "rounds": 25, "weighting": "uniform",
                               "dp": {"mode": "client", "epsilon": 8, "clipping": "adaptive"}})
    dp = client_level_dp(cfg.dp, clients=cfg.clients, clients_per_round=cfg.clients_per_round,
                         rounds=cfg.rounds, seed=cfg.seed, setup_releases=0)
    current = {"w": torch.zeros(5, dtype=torch.float64)}
    generator = torch.Generator().manual_seed(0)

    # Execute: 25 releases of about 10 clients each
    for server_round in range(1, 26):
        updates = [{"w": torch.randn(5, generator=generator, dtype=torch.float64) * 0.05}
                   for _ in range(10)]
        dp.private_update(current, updates, server_round)
    report = json.loads(json.dumps(dp.report()))

    # Assert: within the target and within 1 % of the independent composition
    assert report["epsilon"] <= 8.0
    assert independent_epsilon(report, count_query_sensitivity()) == pytest.approx(
        report["epsilon"], rel=0.01)


def test_a_round_without_updates_releases_noise_on_both_queries():
    # Prepare: a round whose sampled clients all failed (no reply reaches aggregate_train)
    fed = client_dp_federation("fedavg", noise_multiplier=2.0, clipping="adaptive", clip=1.0)
    fed.configure()
    before, clip = fed.state, fed.strategy.client_dp.clip

    # Execute
    fed.aggregate([])

    # Assert: every trained tensor moved by noise of std sigma_delta C / m (m = 2), C moved by
    # the noised count's step, and the round is one release
    dp = fed.strategy.client_dp
    moved = torch.cat([(fed.state[k] - before[k]).flatten() for k in before
                       if part_of(k, HEAD_KEYS) in fed.strategy.trained_parts])
    assert moved.std().item() == pytest.approx(dp.update_sigma * 1.0 / 2, rel=0.3)
    assert dp.clip != clip
    assert [r["round"] for r in dp.releases] == [1]


def test_setup_release_is_the_clipped_sum_plus_noise_and_is_charged():
    # Prepare: a set-up release (a sum of per-client gradient sums, Fed-SB's round 0)
    sums = [{"w": torch.full((100, 100), 10.0, dtype=torch.float64)},  # norm 1000: clipped
            {"w": torch.full((100, 100), 0.001, dtype=torch.float64)}]  # norm 0.1: kept
    quiet = client_dp_federation("fedavg", noise_multiplier=1e-9, clip=1.0)
    noisy = client_dp_federation("fedavg", noise_multiplier=2.0, clip=1.0)

    # Execute
    clipped = quiet.strategy.private_setup(sums)
    released = noisy.strategy.private_setup(sums)

    # Assert: one sum; clip_1(s_1) = 0.01 per entry, s_2 unchanged; noise std sigma C = 2
    assert len(clipped) == 1 and torch.allclose(clipped[0]["w"], torch.full((100, 100), 0.011, dtype=torch.float64))
    assert (released[0]["w"] - 0.011).std().item() == pytest.approx(2.0, rel=0.05)
    assert sum(int(s) for _, _, s in noisy.strategy.privacy.history) == 1


@pytest.mark.parametrize("overrides,message", [
    ({"dp": {"mode": "client", "epsilon": 3, "clipping": "nosuch"}},
     "dp.clipping 'nosuch' is unknown; choose one of: fixed, adaptive"),
    ({"dp": {"mode": "client", "epsilon": 3, "clip": -1}}, "dp.clip=-1.0 must be > 0"),
    ({"dp": {"mode": "client", "epsilon": 3, "noise_multiplier": 2}},
     "dp.epsilon=3 and dp.noise_multiplier=2 are both set"),
    ({"dp": {"mode": "client", "epsilon": 3}, "participation": "markov"},
     "dp.mode=client samples each client with probability"),
    ({"dp": {"mode": "client", "epsilon": 3}, "weighting": "fedau"},
     "dp.mode=client weights every clipped update equally"),
])
def test_bad_client_level_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"strategy": "fedsvd", **overrides})
    assert message in str(error.value) and "\n" not in str(error.value)
