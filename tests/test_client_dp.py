"""Client-level DP (fedlora.privacy.client_level): DP-FedAvg's clipping and noised mean, adaptive
clipping, and planning. Oracles: Flower 1.39's own DP functions (joint clipping, noise std,
effective noise multiplier, geometric update), NumPy norms, the Gaussian's known std, and
Google's dp_accounting for the planned epsilon."""

from __future__ import annotations

import math
import random

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from flwr.supercore import differential_privacy as flwr_dp

from fedlora.privacy import client_level as client_dp

from fedlora.privacy import accounting as privacy
from fedlora.privacy.client_level import AdaptiveClip, clip_update, noised_mean
from tests.experiment_scripts import load_experiment


def random_update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.lora_A": scale * torch.randn(4, 16, generator=generator, dtype=torch.float64),
            "layer.lora_B": scale * torch.randn(16, 4, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("scale,clip", [(1.0, 0.5), (0.01, 0.5), (3.0, 7.0)])
def test_clipping_is_joint_over_tensors_and_equals_flowers(scale, clip):
    # Prepare
    update = random_update(1, scale)
    current = [np.zeros(t.shape) for t in update.values()]
    flower = [t.numpy().copy() for t in update.values()]

    # Execute
    clipped, norm = clip_update(update, clip)
    flwr_dp.compute_clip_model_update(flower, current, clip)  # param1 <- param2 + clip(p1 - p2)

    # Assert
    assert norm == pytest.approx(np.sqrt(sum((t.numpy() ** 2).sum() for t in update.values())))
    assert client_dp.update_norm(clipped) == pytest.approx(min(norm, clip))
    for ours, theirs in zip(clipped.values(), flower):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12)


def test_a_zero_update_stays_zero_and_a_bad_clip_is_refused():
    zero = {"w": torch.zeros(3)}
    assert torch.equal(clip_update(zero, 1.0)[0]["w"], zero["w"])
    with pytest.raises(ValueError, match="clipping norm must be > 0"):
        clip_update(zero, 0.0)


def test_zero_noise_gives_the_sum_of_clipped_updates_over_the_fixed_denominator():
    # Prepare: 3 updates, but m = 4 expected clients
    clipped = [clip_update(random_update(seed), 1.0)[0] for seed in range(3)]

    # Execute
    mean = noised_mean(clipped, 0.0, 1.0, 4, torch.Generator().manual_seed(0))

    # Assert
    for key in clipped[0]:
        torch.testing.assert_close(mean[key], sum(u[key] for u in clipped) / 4)


def test_noise_std_is_sigma_c_over_m_as_flowers_compute_stdv():
    # Prepare: zero updates, so the mean is the noise alone (1e5 coordinates)
    sigma, clip, m = 1.7, 0.3, 5
    updates = [{"w": torch.zeros(100_000, dtype=torch.float64)}] * 3
    global_state = torch.get_rng_state()

    # Execute
    noise = noised_mean(updates, sigma, clip, m, torch.Generator().manual_seed(3))["w"]

    # Assert: relative standard error of the std of 1e5 draws is 0.22 %
    expected = flwr_dp.compute_stdv(sigma, clip, m)
    assert client_dp.noise_std_of_mean(sigma, clip, m) == pytest.approx(expected)
    assert abs(noise.std().item() / expected - 1) < 0.01
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(noise.numel())
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("weights,message", [([1.0, 2.0], "each in \\[0, 1\\]"),
                                             ([1.0], "one per update")])
def test_weights_that_break_the_sensitivity_are_refused(weights, message):
    updates = [{"w": torch.zeros(2)}] * 2
    with pytest.raises(ValueError, match=message):
        noised_mean(updates, 1.0, 1.0, 2, torch.Generator(), weights=weights)


# --------------------------------------------------------------------------------------------
# Adaptive clipping


@pytest.mark.parametrize("sigma,count_stddev", [(0.8, 1.0), (1.5, 2.5), (3.0, 40.0)])
def test_effective_noise_multiplier_matches_flower_and_inverts(sigma, count_stddev):
    # Execute
    update_sigma = client_dp.update_noise_multiplier(sigma, count_stddev)
    _, flowers = flwr_dp.compute_adaptive_noise_params(sigma, 20, count_stddev)

    # Assert
    assert update_sigma == pytest.approx(flowers) and update_sigma > sigma
    assert client_dp.effective_noise_multiplier(update_sigma, count_stddev) == pytest.approx(sigma)


def test_too_little_count_noise_is_refused():
    with pytest.raises(ValueError, match="clipped-count stddev above 1.0"):
        client_dp.update_noise_multiplier(2.0, 0.5)


def test_geometric_step_equals_flowers_on_the_unclipped_fraction():
    # Prepare
    ours = AdaptiveClip(expected_clients=20, clip=0.3)
    flowers = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.5, 20,
                                                            initial_clipping_norm=0.3)

    # Execute
    for fraction in (0.9, 0.1, 0.55, 0.0):
        ours.step(fraction)
        flowers._geometric_update(fraction)

    # Assert
    assert ours.clip == pytest.approx(flowers.clipping_norm)
    assert (ours.target_quantile, ours.learning_rate, ours.clipped_count_stddev) == (
        flowers.target_clipped_quantile, flowers.clip_norm_lr, flowers.clipped_count_stddev)


def lognormal_norms(rng: random.Random, count: int) -> list[float]:
    return [math.exp(rng.gauss(math.log(2.0), 0.5)) for _ in range(count)]  # median 2.0


@pytest.mark.parametrize("quantile,start", [(0.5, 0.1), (0.5, 50.0), (0.8, 0.1)])
def test_adaptive_clip_converges_to_the_target_quantile(quantile, start):
    # Prepare: norms ~ lognormal(log 2, 0.5); 100 clients a round, count noise sigma_b = 5
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    state = AdaptiveClip(expected_clients=100, clip=start, target_quantile=quantile)
    oracle = math.exp(math.log(2.0) + 0.5 * _normal_quantile(quantile))

    # Execute
    clips = [state.update(lognormal_norms(rng, 100), generator) for _ in range(300)]

    # Assert: the last 100 rounds sit near the true quantile
    settled = sum(clips[-100:]) / 100
    assert abs(settled / oracle - 1) < 0.1, (settled, oracle)


def test_flowers_clipped_count_makes_the_clip_run_away():
    # Prepare: Flower's norm bit is True when an update was clipped, fed to the same step
    rng, flowers = random.Random(0), DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 0.0, 100, initial_clipping_norm=1.0, target_clipped_quantile=0.5,
        clipped_count_stddev=0.0)

    # Execute
    for _ in range(200):
        arrays = [[np.array([norm])] for norm in lognormal_norms(rng, 100)]
        clipped = sum(flwr_dp.adaptive_clip_inputs_inplace(a, flowers.clipping_norm) for a in arrays)
        flowers._geometric_update(clipped / 100)

    # Assert: far from the median 2.0 (ours converges there, test above)
    assert flowers.clipping_norm < 0.2


def test_adaptive_clip_state_round_trips():
    # Prepare
    state = AdaptiveClip(expected_clients=10, clip=0.4)
    state.step(0.9)
    restored = AdaptiveClip(expected_clients=1)

    # Execute
    restored.load_state_dict(state.state_dict())

    # Assert
    assert restored == state and restored.clipped_count_stddev == 0.5


def _normal_quantile(p: float) -> float:
    return math.sqrt(2) * _erfinv(2 * p - 1)


def _erfinv(y: float) -> float:
    low, high = -6.0, 6.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if math.erf(middle) < y else (low, middle)
    return (low + high) / 2


# --------------------------------------------------------------------------------------------
# Planning


def dp_accounting_epsilon(sigma: float, rate: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(orders=privacy.RDP_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("per_round,clients,rounds", [(10, 100, 50), (50, 1000, 200)])
def test_planned_client_sigma_is_the_smallest_within_the_target(per_round, clients, rounds):
    # Execute
    sigma = client_dp.plan_client_noise_multiplier(2.0, 1e-5, per_round, clients, rounds)

    # Assert: within the target at sigma, over it 0.01 below (independent RDP accountant)
    rate = per_round / clients
    assert dp_accounting_epsilon(sigma, rate, rounds, 1e-5) <= 2.0 * 1.001
    assert dp_accounting_epsilon(sigma - 0.01, rate, rounds, 1e-5) > 2.0


def test_clients_needed_is_the_fewest_that_keep_the_noise_below_the_bound():
    # Prepare
    total, rounds, bound = 200, 20, 0.05

    # Execute
    needed = client_dp.clients_needed(3.0, 1e-5, rounds, total, 1.0, bound)

    # Assert
    def std(m):
        sigma = client_dp.plan_client_noise_multiplier(3.0, 1e-5, m, total, rounds)
        return client_dp.noise_std_of_mean(sigma, 1.0, m)

    assert needed is not None and std(needed) <= bound < std(needed - 1)
    assert client_dp.clients_needed(3.0, 1e-5, rounds, total, 1.0, 1e-6) is None


def test_the_scale_experiment_puts_m_clients_noise_on_the_mean_of_ten():
    # Prepare: experiments/privacy_client_scale.py emulates m clients a round on the
    # client-level sweep (10 expected a round) by fixing dp.noise_multiplier
    scale = load_experiment("privacy_client_scale")
    zero_updates = [{"w": torch.zeros(200_000, dtype=torch.float64)} for _ in range(10)]

    # Execute
    sigma_10, _, emulated_10 = scale.emulated_noise_multiplier(10, 8.0)
    sigma_160, std_160, emulated_160 = scale.emulated_noise_multiplier(160, 8.0)
    released = noised_mean(zero_updates, emulated_160, scale.CLIP, scale.EXPECTED_PER_ROUND,
                           torch.Generator().manual_seed(0))["w"]

    # Assert: at m = 10 it is the sweep's own sigma; at m = 160 the release over 10 clients has
    # the noise std sigma(160) C / 160 that 160 clients would get (measured, 200 k draws)
    assert emulated_10 == pytest.approx(sigma_10)
    assert emulated_10 == pytest.approx(client_dp.plan_client_noise_multiplier(8.0, 1e-5, 10, 100, 25))
    assert dp_accounting_epsilon(sigma_160, 160 / 1600, 25, 1e-5) <= 8.0 * 1.001
    assert released.std().item() == pytest.approx(sigma_160 * scale.CLIP / 160, rel=0.01)
    assert std_160 == pytest.approx(released.std().item(), rel=0.01)
