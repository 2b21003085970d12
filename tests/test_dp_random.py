"""Secret DP randomness (fedlora.privacy.randomness): the server cannot replay a node's Poisson sample
or noise, the node can, and Opacus really draws its noise from the generator we give it.

Oracles: ``torch.normal`` on an identically seeded twin generator (the noise Opacus must
produce), the Gaussian's known standard deviation, and the global torch RNG state."""

from __future__ import annotations

import math
import random

import pytest
import torch
from flwr.app import RecordDict

from fedlora.privacy import randomness as dp_random
from fedlora.privacy.randomness import (NodeSecret, dp_rng, make_dp_optimizer, reproducible_random,
                                        reproducible_torch_generator, secret_random,
                                        secret_torch_generator)

SEED, ROUND, PARTITION = 7, 3, 5


def poisson_sample(rng: random.Random, n: int = 2000, rate: float = 0.1) -> list[int]:
    return [i for i in range(n) if rng.random() < rate]


def test_two_node_secrets_differ_and_hide_their_key():
    # Execute
    first, second = NodeSecret.generate(), NodeSecret.generate()

    # Assert
    assert first != second and len(first.key) == len(second.key) == 32
    assert first.key.hex() not in repr(first)


def test_the_secret_lives_in_node_state_and_counters_never_repeat():
    # Prepare
    state = RecordDict()

    # Execute
    secret = dp_random.node_secret(state)
    again = dp_random.node_secret(state)
    counters = [dp_random.next_counter(state) for _ in range(5)]

    # Assert
    assert secret == again  # created once, then read back
    assert counters == [0, 1, 2, 3, 4]
    assert dp_random.node_secret(RecordDict()) != secret  # another node, another secret


def test_the_node_replays_its_own_draws_but_the_server_cannot():
    # Prepare
    secret = NodeSecret.generate()

    # Execute
    sample = poisson_sample(secret_random(secret, "poisson", 4))
    replayed = poisson_sample(secret_random(secret, "poisson", 4))
    next_use = poisson_sample(secret_random(secret, "poisson", 5))
    servers_guess = poisson_sample(reproducible_random("poisson", SEED, ROUND, PARTITION))
    noise = torch.randn(1000, generator=secret_torch_generator(secret, "noise", 4))
    noise_replayed = torch.randn(1000, generator=secret_torch_generator(secret, "noise", 4))
    noise_guess = torch.randn(1000, generator=reproducible_torch_generator("noise", SEED, ROUND,
                                                                           PARTITION))

    # Assert
    assert sample == replayed and torch.equal(noise, noise_replayed)
    assert sample != next_use  # each use its own stream
    assert sample != servers_guess
    # Independent N(0,1) vectors: |corr| of 1000 draws is ~0.03; a replay would give 1.
    assert abs(torch.corrcoef(torch.stack([noise, noise_guess]))[0, 1]) < 0.2
    assert not torch.equal(noise, noise_guess)


def test_reproducible_mode_replays_from_seed_round_and_partition():
    # Execute
    first = dp_rng("reproducible", "poisson", "python", seed=SEED, server_round=ROUND,
                   partition_id=PARTITION)
    second = dp_rng("reproducible", "poisson", "python", seed=SEED, server_round=ROUND,
                    partition_id=PARTITION)
    other_round = dp_rng("reproducible", "poisson", "python", seed=SEED, server_round=ROUND + 1,
                         partition_id=PARTITION)

    # Assert
    assert poisson_sample(first) == poisson_sample(second) != poisson_sample(other_round)


def test_secret_mode_spends_a_counter_per_use():
    # Prepare
    state = RecordDict()

    # Execute
    first = dp_rng("secret", "noise", "torch", state=state)
    second = dp_rng("secret", "noise", "torch", state=state)

    # Assert
    assert not torch.equal(torch.randn(50, generator=first), torch.randn(50, generator=second))
    assert int(state.config_records[dp_random.STATE_KEY]["uses"]) == 2


@pytest.mark.parametrize("call,message", [
    (lambda: dp_rng("secret", "noise", "torch"), "needs the node's Context.state"),
    (lambda: dp_rng("reproducible", "noise", "torch", seed=1), "needs seed, server_round"),
    (lambda: dp_rng("public", "noise", "torch", seed=1), "noise mode must be one of"),
    (lambda: secret_random(NodeSecret.generate(), "typo", 0), "unknown randomness purpose"),
])
def test_bad_arguments_name_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_keyed_random_is_uniform_and_supports_random_methods():
    # Prepare
    rng = secret_random(NodeSecret.generate(), "poisson", 0)

    # Execute
    draws = [rng.random() for _ in range(20000)]
    picked = rng.sample(range(100), 10)

    # Assert: mean 1/2 and variance 1/12 of U(0, 1), within 5 standard errors
    mean = sum(draws) / len(draws)
    variance = sum((d - mean) ** 2 for d in draws) / len(draws)
    assert abs(mean - 0.5) < 5 * math.sqrt(1 / 12 / len(draws))
    assert abs(variance - 1 / 12) < 0.005
    assert all(0 <= d < 1 for d in draws) and len(set(picked)) == 10


# --------------------------------------------------------------------------------------------
# Opacus' DPOptimizer with our generator


def noisy_step_gradient(generator: torch.Generator, secure_mode: bool, sigma: float, clip: float,
                        size: int = 1000, batch: int = 4) -> torch.Tensor:
    """The gradient Opacus' DPOptimizer makes from an all-zero per-example gradient: the noise
    alone, divided by the expected batch size."""
    param = torch.nn.Parameter(torch.zeros(size))
    optimizer = make_dp_optimizer(torch.optim.SGD([param], lr=0.0), sigma, clip, batch,
                                  generator, secure_mode)
    param.grad_sample = torch.zeros(batch, size)
    optimizer.pre_step()
    return param.grad * batch


def test_opacus_noise_comes_from_our_generator_and_not_the_global_rng():
    # Prepare
    sigma, clip = 1.3, 0.7
    global_state = torch.get_rng_state()

    # Execute
    noise = noisy_step_gradient(torch.Generator().manual_seed(11), False, sigma, clip)
    expected = sigma * clip * torch.normal(0.0, 1.0, (1000,),
                                           generator=torch.Generator().manual_seed(11))

    # Assert
    assert torch.allclose(noise, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_secure_mode_noise_has_the_right_std_and_leaves_the_global_rng_alone():
    # Prepare
    sigma, clip, size = 1.3, 0.7, 100_000
    global_state = torch.get_rng_state()

    # Execute
    noise = noisy_step_gradient(torch.Generator().manual_seed(12), True, sigma, clip, size=size)
    again = noisy_step_gradient(torch.Generator().manual_seed(12), True, sigma, clip, size=size)

    # Assert: the std of 1e5 draws has relative standard error 1/sqrt(2e5) = 0.22 %
    assert abs(noise.std().item() / (sigma * clip) - 1) < 0.01
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(size)
    assert torch.equal(noise, again)  # all of it from the generator
    assert torch.equal(torch.get_rng_state(), global_state)


def test_make_dp_optimizer_refuses_to_fall_back_on_the_global_rng():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="needs a torch.Generator"):
        make_dp_optimizer(torch.optim.SGD([param], lr=0.1), 1.0, 1.0, 4, None, False)


def test_reproducible_mode_draws_what_fedlora_clients_always_drew():
    """The streams of earlier fedlora versions (a rerun of an old simulation gives its numbers):
    the Poisson sample from ``random.Random(client seed)``, DP-SGD's noise from the global
    torch RNG seeded with it, Fed-SB's init noise from a fresh generator seeded with it."""
    # Prepare: the client seed as fedlora's ClientSetup wrote it before this module existed
    old_seed = (SEED * 1_000_003 + ROUND) * 1_000_003 + PARTITION
    saved = torch.get_rng_state()

    # Execute
    sample = poisson_sample(dp_rng("reproducible", "poisson", "python", seed=SEED,
                                   server_round=ROUND, partition_id=PARTITION))
    noise = torch.randn(50, generator=dp_rng("reproducible", "noise", "torch", seed=SEED,
                                             server_round=ROUND, partition_id=PARTITION))
    torch.manual_seed(old_seed)
    global_noise = torch.randn(50)  # what Opacus drew without a generator
    init_noise = torch.randn(50, generator=dp_rng("reproducible", "init-noise", "torch", seed=SEED,
                                                  server_round=ROUND, partition_id=PARTITION))
    torch.set_rng_state(saved)

    # Assert
    assert sample == poisson_sample(random.Random(old_seed))
    assert torch.equal(noise, global_noise)
    assert torch.equal(init_noise, torch.randn(50, generator=torch.Generator().manual_seed(old_seed)))
