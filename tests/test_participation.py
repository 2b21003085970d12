"""FedAU weights and participation models (fedlora.aggregation.participation).

ALGORITHMS.md invariant 7 and the FedAU test invariants 13-17 of
notes/methods-b-lorafair-fedsvd-fedau-dp-comm.md (FedAU, arXiv 2306.03401; models as in
IBM/fedau util.py). Statistical tests use fixed seeds and tolerances of at least 5 standard
deviations of the estimate, computed in each test, unless the spec fixes the tolerance.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation.maths import server_step_weights, weighted_sum
from fedlora.aggregation.participation import (Bernoulli, ClientWeighting, Cyclic, FedAUWeights, Markov, Uniform,
                                               participation_probabilities, write_participation_csv)

F64 = torch.float64


def run_fedau(estimator: FedAUWeights, pattern: np.ndarray) -> list[dict[int, float]]:
    """Feed a [rounds, clients] boolean pattern; returns each round's weights."""
    return [estimator.step(np.flatnonzero(row).tolist()) for row in pattern]


def reference_fedau_weights(pattern: np.ndarray, cutoff: int | None) -> list[dict[int, float]]:
    """Slow, obvious transcription of IBM/fedau main.py's loop: explicit interval lists."""
    num_clients = pattern.shape[1]
    absent_count = [0] * num_clients
    intervals: list[list[int]] = [[] for _ in range(num_clients)]
    k_value = math.inf if cutoff is None else cutoff
    out = []
    for row in pattern:
        weights = {}
        for n in range(num_clients):
            if row[n]:
                weights[n] = sum(intervals[n]) / len(intervals[n]) if intervals[n] else 1.0
                intervals[n].append(absent_count[n] + 1)
                absent_count[n] = 0
            else:
                absent_count[n] += 1
                if absent_count[n] >= k_value:
                    intervals[n].append(absent_count[n])
                    absent_count[n] = 0
        out.append(weights)
    return out


def truncated_geometric_moments(p: float, cutoff: int | None) -> tuple[float, float]:
    """Mean and variance of one recorded interval, min(Geometric(p), K), under Bernoulli(p)."""
    if cutoff is None:
        return 1 / p, (1 - p) / p**2
    lengths = np.arange(1, cutoff + 1, dtype=np.float64)
    pmf = p * (1 - p) ** (lengths - 1)
    pmf[-1] = (1 - p) ** (cutoff - 1)  # interval K: participation at K or absence of K rounds
    mean = float(pmf @ lengths)
    return mean, float(pmf @ lengths**2) - mean**2


# --------------------------------------------------------------------------------------------
# FedAU estimator: the worked example and the cutoff


def test_fedau_worked_example_weights_and_intervals():
    # Prepare: one client, participation 1,0,0,1,0,1 over rounds 0-5, no cutoff
    estimator = FedAUWeights(num_clients=1)
    pattern = [1, 0, 0, 1, 0, 1]
    weights_used, recorded = {}, []

    # Execute
    for round_index, participates in enumerate(pattern):
        count_before = int(estimator.interval_count[0])
        sum_before = int(estimator.interval_sum[0])
        weights = estimator.step([0] if participates else [])
        if participates:
            weights_used[round_index] = weights[0]
        else:
            assert weights == {}
        if estimator.interval_count[0] > count_before:
            recorded.append(int(estimator.interval_sum[0]) - sum_before)

    # Assert: weights 1, 1, 2 at rounds 0, 3, 5; intervals 1, 3, 2
    assert weights_used == {0: 1.0, 3: 1.0, 5: 2.0}
    assert recorded == [1, 3, 2]
    assert estimator.interval_sum[0] == 6 and estimator.interval_count[0] == 3
    assert estimator.rounds_absent[0] == 0
    assert estimator.current_weights()[0] == 2.0


@pytest.mark.parametrize("cutoff", [1, 3, 7])
def test_fedau_absence_of_two_cutoffs_records_two_intervals_of_cutoff(cutoff):
    # Prepare
    estimator = FedAUWeights(num_clients=2, cutoff=cutoff)

    # Execute: client 0 absent for 2K rounds (client 1 takes part, so rounds are not empty)
    for _ in range(2 * cutoff):
        estimator.step([1])

    # Assert
    assert estimator.interval_count[0] == 2
    assert estimator.interval_sum[0] == 2 * cutoff
    assert estimator.rounds_absent[0] == 0
    assert estimator.current_weights()[0] == float(cutoff)


def test_fedau_rounds_without_participants_still_advance_counters():
    # Prepare
    estimator = FedAUWeights(num_clients=3)

    # Execute: two empty rounds, then client 2 participates twice
    assert estimator.step([]) == {}
    assert estimator.step(()) == {}
    first = estimator.step([2])
    second = estimator.step([2])

    # Assert: the first interval is (first participation index) + 1 = 3
    assert first == {2: 1.0}
    assert second == {2: 3.0}
    assert estimator.rounds_absent.tolist() == [4, 4, 0]
    assert estimator.rounds_seen == 4


def test_fedau_rejects_duplicate_and_unknown_clients():
    estimator = FedAUWeights(num_clients=3)
    with pytest.raises(ValueError, match="twice"):
        estimator.step([1, 1])
    with pytest.raises(ValueError, match="outside 0..2"):
        estimator.step([3])
    with pytest.raises(ValueError, match="cutoff"):
        FedAUWeights(num_clients=3, cutoff=0)
    # Failed calls change nothing.
    assert estimator.rounds_seen == 0 and estimator.rounds_absent.tolist() == [0, 0, 0]


def test_fedau_infinite_cutoff_means_no_cutoff():
    assert FedAUWeights(4, cutoff=math.inf).cutoff is None


# --------------------------------------------------------------------------------------------
# FedAU estimator: long-run values under Bernoulli participation (invariant 15)


@pytest.mark.parametrize("cutoff", [None, 5])
def test_fedau_weights_converge_under_bernoulli(cutoff):
    # Prepare: 20 clients at p = 0.1 and 20 at p = 0.3, 20 000 rounds
    num_rounds, clients_per_p = 20_000, 20
    probabilities = np.repeat([0.1, 0.3], clients_per_p)
    pattern = Bernoulli(probabilities, seed=7).matrix(num_rounds)
    estimator = FedAUWeights(len(probabilities), cutoff=cutoff)

    # Execute
    run_fedau(estimator, pattern)
    omega = estimator.current_weights()

    # Assert
    for group, p in enumerate([0.1, 0.3]):
        target = 1 / p if cutoff is None else (1 - (1 - p) ** cutoff) / p
        mean, variance = truncated_geometric_moments(p, cutoff)
        assert mean == pytest.approx(target, rel=1e-12)
        group_omega = omega[group * clients_per_p:(group + 1) * clients_per_p]
        # The spec's 3 %, on the mean over the group: its standard error is
        # sqrt(var / (#intervals * #clients)) / mean <= 0.5 %, so 3 % is >= 6 sigma.
        assert abs(group_omega.mean() / target - 1) < 0.03
        # Each client on its own: ~num_rounds/mean intervals; allow 5 standard errors.
        client_sigma = math.sqrt(variance / (num_rounds / mean))
        assert np.all(np.abs(group_omega - target) < 5 * client_sigma)
        if cutoff is not None:
            assert np.all(omega <= cutoff)


# --------------------------------------------------------------------------------------------
# FedAU estimator: property tests against the obvious implementation


patterns = st.integers(1, 5).flatmap(
    lambda clients: st.lists(st.lists(st.booleans(), min_size=clients, max_size=clients),
                             min_size=1, max_size=60))
cutoffs = st.one_of(st.none(), st.integers(1, 10))


@settings(max_examples=150, deadline=None)
@given(pattern=patterns, cutoff=cutoffs)
def test_fedau_matches_reference_transcription(pattern, cutoff):
    pattern = np.array(pattern, dtype=bool)
    estimator = FedAUWeights(pattern.shape[1], cutoff=cutoff)
    assert run_fedau(estimator, pattern) == reference_fedau_weights(pattern, cutoff)


@settings(max_examples=150, deadline=None)
@given(pattern=patterns, cutoff=cutoffs)
def test_fedau_weight_uses_only_intervals_recorded_before_the_round(pattern, cutoff):
    pattern = np.array(pattern, dtype=bool)
    estimator = FedAUWeights(pattern.shape[1], cutoff=cutoff)
    for round_index, row in enumerate(pattern):
        before = estimator.current_weights().copy()
        sums, counts = estimator.interval_sum.copy(), estimator.interval_count.copy()
        weights = estimator.step(np.flatnonzero(row).tolist())
        for client, omega in weights.items():
            # Exactly the mean of earlier intervals (1 before any): independent of I_n^t.
            expected = sums[client] / counts[client] if counts[client] else 1.0
            assert omega == expected == before[client]
            # Positive, at least 1, never more than the rounds elapsed, at most K.
            assert 1.0 <= omega <= round_index + 1
            if cutoff is not None:
                assert omega <= cutoff
        assert set(weights) == set(np.flatnonzero(row).tolist())


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, cutoff=cutoffs, data=st.data())
def test_fedau_client_weight_ignores_other_clients(pattern, cutoff, data):
    # A client's weights depend on its own participation only.
    pattern = np.array(pattern, dtype=bool)
    scrambled = pattern.copy()
    scrambled[:, 1:] = np.array(data.draw(st.lists(st.booleans(), min_size=scrambled[:, 1:].size,
                                                    max_size=scrambled[:, 1:].size)),
                                dtype=bool).reshape(scrambled[:, 1:].shape)
    first = run_fedau(FedAUWeights(pattern.shape[1], cutoff), pattern)
    second = run_fedau(FedAUWeights(pattern.shape[1], cutoff), scrambled)
    assert [w.get(0) for w in first] == [w.get(0) for w in second]


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, cutoff=cutoffs, data=st.data())
def test_fedau_state_round_trip_mid_run(pattern, cutoff, data):
    # Prepare
    pattern = np.array(pattern, dtype=bool)
    split = data.draw(st.integers(0, len(pattern)))
    uninterrupted = FedAUWeights(pattern.shape[1], cutoff)
    expected = run_fedau(uninterrupted, pattern)

    # Execute: stop at `split`, checkpoint through JSON, resume in a fresh estimator
    first_half = FedAUWeights(pattern.shape[1], cutoff)
    run_fedau(first_half, pattern[:split])
    resumed = FedAUWeights(pattern.shape[1], cutoff)
    resumed.load_state_dict(json.loads(json.dumps(first_half.state_dict())))
    continued = run_fedau(resumed, pattern[split:])

    # Assert
    assert expected[split:] == continued
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_fedau_load_rejects_other_configuration():
    state = FedAUWeights(4, cutoff=10).state_dict()
    with pytest.raises(ValueError, match="cutoff=10"):
        FedAUWeights(4, cutoff=None).load_state_dict(state)
    with pytest.raises(ValueError, match="num_clients=4"):
        FedAUWeights(5, cutoff=10).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# FedAU server update (invariant 16)


def fedau_server_step(x, client_values, coefficients, server_lr):
    """fedlora's one FedAU server step: ``c_k = omega_k / N`` into the shared delta rule
    (``server_step_weights``, the previous value as one more weighted term)."""
    weights, previous = server_step_weights(coefficients, server_lr, normalised=False)
    return weighted_sum(list(client_values) + [x], weights + [previous])


def test_fedau_step_full_participation_with_unit_weights_is_scaled_mean():
    # Prepare: in FedAU's first round every omega is 1
    gen = torch.Generator().manual_seed(0)
    num_clients, server_lr = 5, 0.7
    x = torch.randn(6, 4, generator=gen, dtype=F64)
    deltas = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(num_clients)]
    weighting = ClientWeighting("fedau", num_clients)

    # Execute
    coefficients = weighting.coefficients(list(range(num_clients)), [1] * num_clients)
    update = fedau_server_step(x, [x + d for d in deltas], coefficients, server_lr) - x

    # Assert
    expected = server_lr * torch.stack(deltas).mean(dim=0)
    assert coefficients == [1 / num_clients] * num_clients
    assert update.dtype == F64 and update.shape == (6, 4)
    assert (update - expected).abs().max().item() <= 1e-14


def test_fedau_step_single_participant_divides_by_all_clients():
    # Prepare: client 3 took part in rounds 1 and 4, so omega_3 = (1 + 3) / 2 = 2 in round 7
    gen = torch.Generator().manual_seed(1)
    x, delta = torch.randn(3, 8, generator=gen, dtype=F64), torch.randn(3, 8, generator=gen, dtype=F64)
    num_clients, server_lr = 10, 1.3
    weighting = ClientWeighting("fedau", num_clients)
    for participants in ([3], [], [], [3], [], []):
        weighting.coefficients(participants, [1] * len(participants))

    # Execute
    coefficients = weighting.coefficients([3], [1])
    update = fedau_server_step(x, [x + delta], coefficients, server_lr) - x

    # Assert: eta * omega * delta / N, not renormalised to omega = 1, not divided by 1
    assert coefficients == [2.0 / num_clients]
    assert (update - server_lr * 2.0 * delta / num_clients).abs().max().item() <= 1e-14


@settings(max_examples=50, deadline=None)
@given(participants=st.integers(1, 6), extra_clients=st.integers(0, 10),
       omegas=st.lists(st.floats(1.0, 50.0), min_size=6, max_size=6),
       server_lr=st.floats(0.01, 10.0), seed=st.integers(0, 2**31 - 1))
def test_fedau_step_equals_literal_formula(participants, extra_clients, omegas, server_lr, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    deltas = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(participants)]
    omegas = omegas[:participants]
    num_clients = participants + extra_clients
    update = fedau_server_step(x, [x + d for d in deltas], [w / num_clients for w in omegas],
                               server_lr) - x
    literal = server_lr * (1 / num_clients) * sum(w * d for w, d in zip(omegas, deltas))
    assert torch.allclose(update, literal, rtol=1e-10, atol=1e-10)


def test_client_weighting_validates_inputs():
    with pytest.raises(ValueError, match="weighting must be one of"):
        ClientWeighting("fedprox", 4)
    with pytest.raises(ValueError, match="appears twice"):
        ClientWeighting("fedau", 4).coefficients([1, 1], [5, 5])
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        ClientWeighting("fedau", 4).coefficients([4], [5])


# --------------------------------------------------------------------------------------------
# Participation models (invariant 17)

RATE_PROBABILITIES = [0.02, 0.1, 0.3, 0.5]
CLIENTS_PER_P = 40
LONG_RUN = 20_000


@pytest.mark.parametrize("model", ["bernoulli", "markov"])
def test_long_run_participation_rate_matches_probability(model):
    # Prepare: 40 clients at each p (p = 0.02 exercises Markov's b > 1 branch)
    probabilities = np.repeat(RATE_PROBABILITIES, CLIENTS_PER_P)
    sampler = Bernoulli(probabilities, seed=3) if model == "bernoulli" else Markov(probabilities, seed=3)

    # Execute
    rates = sampler.matrix(LONG_RUN).mean(axis=0)

    # Assert: group mean within 5 % of p. Worst case, Markov at p = 0.5 (a = b = 0.05): rate
    # variance p(1-p)/T * (1+lam)/(1-lam) with lam = 1-a-b; the relative standard error of a
    # group mean over 40 clients is at most 0.6 % (p = 0.1, 0.3), so 5 % is > 8 sigma.
    for group, p in enumerate(RATE_PROBABILITIES):
        group_rate = rates[group * CLIENTS_PER_P:(group + 1) * CLIENTS_PER_P].mean()
        assert abs(group_rate / p - 1) < 0.05, (model, p, group_rate)


def test_markov_transition_probabilities_follow_the_reference():
    # Prepare / Execute
    sampler = Markov([0.5, 0.1, 0.02, 1.0], seed=0, a=0.05)

    # Assert: b = a (1/p - 1); if b > 1 then a <- a/b, b <- 1; stationary a/(a+b) = p
    b_for_p002 = 0.05 * (1 / 0.02 - 1)
    assert b_for_p002 > 1
    np.testing.assert_allclose(sampler.to_inactive_probability, [0.05, 0.45, 1.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(sampler.to_active_probability, [0.05, 0.05, 0.05 / b_for_p002, 0.05],
                               rtol=1e-12)
    stationary = sampler.to_active_probability / (sampler.to_active_probability
                                                  + sampler.to_inactive_probability)
    np.testing.assert_allclose(stationary, sampler.probabilities, rtol=1e-12)


def test_markov_matches_reference_transcription_draw_for_draw():
    # IBM/fedau WorkerSampler('markov-a'), per client and per round, fed the same uniform draws
    # (initial state: one draw per client; then one draw per client per round): transition
    # first, then report the new state.
    probabilities, a, seed, num_rounds = [0.5, 0.1, 0.02, 0.9], 0.3, 21, 200
    rng = np.random.default_rng(seed)
    to_active, to_inactive = [], []
    for p in probabilities:
        b = a * (1 / p - 1)
        to_active.append(a / b if b > 1 else a)
        to_inactive.append(min(b, 1.0))
    currently_active = list(rng.random(len(probabilities)) < probabilities)
    expected = []
    for _ in range(num_rounds):
        draws = rng.random(len(probabilities))
        for n, draw in enumerate(draws):
            if currently_active[n]:
                if draw < to_inactive[n]:
                    currently_active[n] = False
            elif draw < to_active[n]:
                currently_active[n] = True
        expected.append(list(currently_active))

    assert np.array_equal(Markov(probabilities, seed=seed, a=a).matrix(num_rounds), np.array(expected))


def test_markov_chain_is_persistent():
    # With a = b = 0.05 the state changes in ~5 % of rounds; Bernoulli(0.5) would change in 50 %.
    pattern = Markov([0.5] * 20, seed=4, a=0.05).matrix(5_000)
    switch_rate = (pattern[1:] != pattern[:-1]).mean()
    # Expected 0.05; s.e. ~ sqrt(0.05 * 0.95 / 1e5) = 0.0007, so +-0.005 is ~7 sigma.
    assert abs(switch_rate - 0.05) < 0.005


def test_cyclic_runs_phase_and_rate():
    # Prepare: L = 100; p = 0.3 gives L_on = 30, L_off = 70; p = 0.025 rounds half to even to 2
    probabilities = [0.3, 0.3, 0.025, 0.004, 0.995, 1.0]
    sampler = Cyclic(probabilities, seed=5, cycle_length=100)

    # Execute
    pattern = sampler.matrix(LONG_RUN)

    # Assert
    assert sampler.active_run.tolist() == [30, 30, 2, 1, 100, 100]
    assert sampler.inactive_run.tolist() == [70, 70, 98, 99, 1, 1]
    for client in range(len(probabilities)):
        on, off = sampler.active_run[client], sampler.inactive_run[client]
        column = pattern[:, client].astype(int)
        first_active = int(np.argmax(column))
        assert first_active < off  # random phase in {0, ..., L_off - 1}
        # From the first activation on, the pattern is exactly L_on ones then L_off zeros.
        period = np.r_[np.ones(on, dtype=int), np.zeros(off, dtype=int)]
        tail = column[first_active:]
        assert np.array_equal(tail, np.resize(period, tail.size))
        # Long-run rate L_on / (L_on + L_off): only the initial phase and the last, partial
        # cycle deviate from it, so the error is below 2 (L_on + L_off) / T = 1 % (deterministic).
        assert abs(column.mean() - on / (on + off)) < 2 * (on + off) / LONG_RUN


def test_cyclic_countdown_follows_reference_update():
    # One client, L_on = L_off = 2: the countdown drawn in {0, 1} fixes the whole pattern.
    patterns = {tuple(Cyclic([0.5], seed=seed, cycle_length=4).matrix(6)[:, 0].astype(int))
                for seed in range(40)}
    # countdown 0: active at round 0; countdown 1: inactive at round 0, active at round 1.
    assert patterns == {(1, 1, 0, 0, 1, 1), (0, 1, 1, 0, 0, 1)}


def test_uniform_draws_exactly_per_round_distinct_clients():
    # Prepare
    num_clients, per_round, num_rounds = 30, 7, 4_000
    sampler = Uniform(num_clients, per_round, seed=11)

    # Execute
    pattern = sampler.matrix(num_rounds)
    listed = [sampler.active(t) for t in range(50)]

    # Assert
    assert np.all(pattern.sum(axis=1) == per_round)
    assert all(len(ids) == len(set(ids)) == per_round and ids == sorted(ids) for ids in listed)
    # Each client's rate per_round / N = 0.233; s.e. sqrt(.233 * .767 / 4000) = 0.0067, 5 sigma.
    assert np.all(np.abs(pattern.mean(axis=0) - per_round / num_clients) < 5 * 0.0067)
    np.testing.assert_allclose(sampler.probabilities, per_round / num_clients)


SAMPLERS = {
    "bernoulli": lambda seed: Bernoulli([0.1, 0.3, 0.5, 0.9, 0.02], seed),
    "markov": lambda seed: Markov([0.1, 0.3, 0.5, 0.9, 0.02], seed, a=0.05),
    "cyclic": lambda seed: Cyclic([0.1, 0.3, 0.5, 0.9, 0.02], seed, cycle_length=20),
    "uniform": lambda seed: Uniform(5, 2, seed),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_matrix_different_seed_different(name):
    make = SAMPLERS[name]
    first, again, other = make(0).matrix(400), make(0).matrix(400), make(1).matrix(400)
    assert first.shape == (400, 5) and first.dtype == bool
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_active_round_by_round_equals_matrix_and_state_round_trips(name):
    # Prepare
    make = SAMPLERS[name]
    expected = make(9).matrix(300)
    sampler = make(9)

    # Execute: 120 rounds, checkpoint through JSON, resume in a model built with another seed
    first = [sampler.active(t) for t in range(120)]
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = make(12345)
    resumed.load_state_dict(state)
    rest = [resumed.active(t) for t in range(120, 300)]

    # Assert
    assert [np.flatnonzero(row).tolist() for row in expected] == first + rest
    # matrix() replays from the seed without moving the model.
    assert np.array_equal(resumed.matrix(300), make(12345).matrix(300))
    assert resumed.next_round == 300


def test_active_must_be_called_in_round_order():
    sampler = Bernoulli([0.5, 0.5], seed=0)
    sampler.active(0)
    with pytest.raises(ValueError, match="expected round 1, got 2"):
        sampler.active(2)


@pytest.mark.parametrize("bad", [[0.0, 0.5], [0.5, 1.2], [float("nan")], []])
def test_models_reject_invalid_probabilities(bad):
    with pytest.raises(ValueError, match="probabilities"):
        Bernoulli(bad, seed=0)


def test_uniform_rejects_more_per_round_than_clients():
    with pytest.raises(ValueError, match="per_round must be an integer in 1..3"):
        Uniform(3, 4, seed=0)


# --------------------------------------------------------------------------------------------
# Participation probabilities correlated with the label mix


def test_probabilities_are_linear_in_label_mix_with_floor():
    # Prepare: C = 10 one-hot clients, then mixtures of them, an empty client, and raw counts
    num_classes = 10
    one_hot = np.eye(num_classes) * 50
    half_half = (one_hot[0] + one_hot[3]) / 2
    histograms = np.vstack([one_hot, half_half, np.zeros(num_classes), 7 * one_hot[4] + 3 * one_hot[5]])

    # Execute
    raw = participation_probabilities(histograms, seed=2, p_min=0.0)
    floored = participation_probabilities(histograms, seed=2)

    # Assert: raw p_n = C * mean_p * <pi_n, v>, linear in pi_n and scale-free in the counts
    assert raw[10] == pytest.approx((raw[0] + raw[3]) / 2, rel=1e-12)
    assert raw[12] == pytest.approx(0.7 * raw[4] + 0.3 * raw[5], rel=1e-12)
    # v is a probability vector, so the one-hot clients' raw values sum to C * mean_p = 1
    assert raw[:num_classes].sum() == pytest.approx(num_classes * 0.1, rel=1e-12)
    # Floor p_min = 0.02, also for the empty client
    assert floored[11] == 0.02
    np.testing.assert_array_equal(floored[:10], np.maximum(0.02, raw[:10]))
    assert floored.min() >= 0.02 and floored.max() <= 1.0


def test_probabilities_correlate_with_favoured_classes():
    # Prepare: 500 clients with Dirichlet(0.1) label mixes over C = 10 classes
    rng = np.random.default_rng(0)
    num_classes = 10
    histograms = rng.multinomial(200, rng.dirichlet(0.1 * np.ones(num_classes), size=500))
    raw_one_hot = participation_probabilities(np.eye(num_classes), seed=8, p_min=0.0)
    favoured = int(np.argmax(raw_one_hot))

    # Execute
    probabilities = participation_probabilities(histograms, seed=8)

    # Assert: heterogeneous, and higher for clients holding more of the favoured class
    share = histograms[:, favoured] / histograms.sum(axis=1)
    assert probabilities.std() > 0.02
    assert np.corrcoef(share, probabilities)[0, 1] > 0.5
    high, low = share > 0.5, share < 0.05
    assert probabilities[high].min() > probabilities[low].mean()


def test_probabilities_mean_is_mean_p_for_a_balanced_federation():
    # A federation whose clients together hold a uniform label mix (20 clients per class, each
    # holding one class): mean_n <pi_n, v> = <uniform, v> = 1/C for ANY v, so the mean of the
    # unfloored p_n is exactly mean_p; the floor adds at most p_min per client, so the floored
    # mean lies in [mean_p, mean_p + p_min]. This bound is deterministic, not statistical.
    histograms = np.repeat(np.eye(10) * 30, 20, axis=0)
    for seed in range(5):
        raw = participation_probabilities(histograms, seed=seed, p_min=0.0)
        floored = participation_probabilities(histograms, seed=seed)
        assert raw.mean() == pytest.approx(0.1, rel=1e-12)
        assert 0.1 <= floored.mean() <= 0.1 + 0.02


def test_probabilities_seeded():
    histograms = np.random.default_rng(1).integers(0, 20, size=(30, 5))
    first = participation_probabilities(histograms, seed=3)
    assert np.array_equal(first, participation_probabilities(histograms, seed=3))
    assert not np.array_equal(first, participation_probabilities(histograms, seed=4))
    with pytest.raises(ValueError, match="clients, classes"):
        participation_probabilities(np.ones(5), seed=0)


# --------------------------------------------------------------------------------------------
# CSV


def test_write_participation_csv_wide_format(tmp_path):
    # Prepare
    pattern = Bernoulli([0.2, 0.5, 0.9], seed=0).matrix(25)
    path = tmp_path / "participation.csv"

    # Execute
    write_participation_csv(path, pattern)

    # Assert
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["round", "c0", "c1", "c2"]
    assert len(rows) == 26
    assert [int(row[0]) for row in rows[1:]] == list(range(25))
    assert np.array_equal(np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=bool), pattern)
