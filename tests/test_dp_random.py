"""Secret DP randomness (fedlora.privacy.randomness): the server cannot replay a node's Poisson
sample or noise, the node can, every bit of a 256-bit key matters, and Opacus really draws its
noise from the source we give it.

Oracles: RFC 8439's ChaCha20 test vector; the documented Gaussian construction recomputed in
plain Python from the keystream's bytes; ``torch.normal`` on an identically seeded twin
generator (the noise Opacus must produce in reproducible mode); the normal distribution itself
(mean, std and a Kolmogorov-Smirnov test on 10^6 draws, scipy's); and the global torch RNG
state."""

from __future__ import annotations

import math
import pickle
import random
import struct

import pytest
import torch
from flwr.app import RecordDict

from fedlora.privacy import randomness as dp_random
from fedlora.privacy.randomness import (KeyStream, NodeSecret, dp_rng, make_dp_optimizer,
                                        reproducible_random, reproducible_torch_generator,
                                        secret_noise, secret_random)

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
    noise = secret_noise(secret, "noise", 4).normal(1.0, (1000,))
    noise_replayed = secret_noise(secret, "noise", 4).normal(1.0, (1000,))
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
    first = dp_rng("reproducible", "poisson", seed=SEED, server_round=ROUND,
                   partition_id=PARTITION)
    second = dp_rng("reproducible", "poisson", seed=SEED, server_round=ROUND,
                    partition_id=PARTITION)
    other_round = dp_rng("reproducible", "poisson", seed=SEED, server_round=ROUND + 1,
                         partition_id=PARTITION)

    # Assert
    assert poisson_sample(first) == poisson_sample(second) != poisson_sample(other_round)


def test_secret_mode_spends_a_counter_per_use():
    # Prepare
    state = RecordDict()

    # Execute
    first = dp_rng("secret", "noise", state=state)
    second = dp_rng("secret", "noise", state=state)

    # Assert
    assert isinstance(first, KeyStream) and isinstance(second, KeyStream)
    assert not torch.equal(first.normal(1.0, (50,)), second.normal(1.0, (50,)))
    assert int(state.config_records[dp_random.STATE_KEY]["uses"]) == 2


@pytest.mark.parametrize("call,message", [
    (lambda: dp_rng("secret", "noise"), "needs the node's Context.state"),
    (lambda: dp_rng("reproducible", "noise", seed=1), "needs seed, server_round"),
    (lambda: dp_rng("public", "noise", seed=1), "noise mode must be one of"),
    (lambda: secret_random(NodeSecret.generate(), "typo", 0), "unknown randomness purpose"),
    (lambda: dp_rng("secret", "typo", state=RecordDict()), "unknown randomness purpose"),
    (lambda: KeyStream(b"short"), "a key stream's key is 32 bytes"),
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
# The key stream: ChaCha20, its uniforms and its hardened Gaussians

KEY = bytes(range(32))
# RFC 8439, appendix A.1, test vector #1: the ChaCha20 block of the all-zero key and nonce,
# block counter 0.
RFC8439_A1_BLOCK0 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def flipped(key: bytes, bit: int) -> bytes:
    value = int.from_bytes(key, "little") ^ (1 << bit)
    return value.to_bytes(len(key), "little")


def test_the_key_stream_is_rfc_8439_chacha20():
    assert KeyStream(bytes(32)).read(64) == RFC8439_A1_BLOCK0


@pytest.mark.parametrize("bit", [0, 1, 31, 32, 33, 63, 64, 100, 127, 128, 200, 255])
def test_every_bit_of_the_key_changes_the_noise(bit):
    """The old secret noise came from a CPU torch.Generator, which keeps 32 bits of its seed:
    flipping bit 0 or any bit from 33 up left the noise unchanged, and 2^32 guesses found it."""
    # Execute
    noise = KeyStream(KEY).normal(1.0, (4096,))
    other = KeyStream(flipped(KEY, bit)).normal(1.0, (4096,))

    # Assert: not one coordinate shared, and uncorrelated (|corr| of 4096 pairs is ~0.016)
    assert not torch.any(noise == other)
    assert abs(torch.corrcoef(torch.stack([noise, other]))[0, 1]) < 0.1


@pytest.mark.parametrize("bit", [0, 33, 64, 100, 128, 255])
def test_every_bit_of_a_uses_key_changes_dp_sgd_noise(monkeypatch, bit):
    # Prepare: the key HMAC derives for this use, fixed, then one bit of it flipped
    keys = iter([KEY, flipped(KEY, bit)])
    monkeypatch.setattr(dp_random, "_derived_key", lambda secret, purpose, counter: next(keys))

    # Execute: the noise of one DP-SGD step through the node's own path, once per key
    first = noisy_step_gradient(dp_rng("secret", "noise", state=RecordDict()), 1.0, 1.0)
    second = noisy_step_gradient(dp_rng("secret", "noise", state=RecordDict()), 1.0, 1.0)

    # Assert
    assert not torch.any(first == second)


def test_uniforms_lie_on_the_open_53_bit_grid():
    # Execute
    uniforms = KeyStream(KEY).uniform(100_000)

    # Assert: (k + 1/2) 2^-53 with 0 <= k < 2^53, never 0 or 1; mean 1/2 within 5 standard errors
    grid = uniforms * 2.0 ** 53 - 0.5
    assert uniforms.dtype == torch.float64
    assert torch.equal(grid, grid.round()) and grid.min() >= 0 and grid.max() < 2.0 ** 53
    assert 0 < uniforms.min() and uniforms.max() < 1
    assert abs(uniforms.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / uniforms.numel())


def documented_noise(key: bytes, std: float, count: int, piece: int) -> list[float]:
    """docs/privacy.md's construction in plain Python, from the keystream's bytes: per piece of
    m coordinates, 4m uniforms ((top 53 bits + 1/2) 2^-53), Box-Muller on (u_i, u_2m+i) giving
    r cos first and r sin after, coordinate j = std/2 * the sum of draws j, m + j, 2m + j, 3m + j."""
    stream, noise = KeyStream(key), []
    for first in range(0, count, piece):
        m = min(piece, count - first)
        words = struct.unpack(f"<{4 * m}Q", stream.read(32 * m))
        uniforms = [((word >> 11) + 0.5) * 2.0 ** -53 for word in words]
        radius = [math.sqrt(-2 * math.log(u)) for u in uniforms[:2 * m]]
        angles = [2 * math.pi * u for u in uniforms[2 * m:]]
        draws = ([r * math.cos(a) for r, a in zip(radius, angles)]
                 + [r * math.sin(a) for r, a in zip(radius, angles)])
        noise += [std / 2 * sum(draws[j + m * i] for i in range(4)) for j in range(m)]
    return noise


@pytest.mark.parametrize("piece", [8192, 2], ids=["one-piece", "pieces-of-2"])
def test_hardened_noise_is_four_box_muller_draws_from_the_keystream_summed_and_halved(
        monkeypatch, piece):
    # Prepare
    monkeypatch.setattr(dp_random, "_PIECE", piece)
    std, count = 2.5, 5

    # Execute
    noise = KeyStream(KEY).normal(std, (count,), torch.float64)

    # Assert
    assert noise.tolist() == pytest.approx(documented_noise(KEY, std, count, piece),
                                           rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("draw", ["hardened", "box-muller"])
def test_a_million_secret_gaussians_have_the_right_mean_std_and_shape(draw):
    from scipy import stats

    # Prepare: a fixed key, so the test is deterministic
    std, count = 1.7, 1_000_000
    stream = KeyStream(KEY)

    # Execute
    if draw == "hardened":
        samples = stream.normal(std, (count,), torch.float64)
    else:
        samples = std * stream.standard_normal(count)

    # Assert: mean and std within 5 standard errors, and Kolmogorov-Smirnov against N(0, std^2)
    assert abs(samples.mean().item()) < 5 * std / math.sqrt(count)
    assert abs(samples.std().item() / std - 1) < 5 / math.sqrt(2 * count)
    assert stats.kstest(samples.numpy() / std, "norm").pvalue > 1e-3


def test_noise_takes_the_reference_tensors_dtype_and_device():
    # Prepare
    references = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.bfloat16),
                  torch.zeros(2, 2, dtype=torch.float64)]
    if torch.cuda.is_available():
        references.append(torch.zeros(7, device="cuda"))

    # Execute
    noises = KeyStream(KEY).normal_like(0.5, references)
    flat = KeyStream(KEY).normal(0.5, (sum(r.numel() for r in references),), torch.float64)

    # Assert: one draw, cut into the references' shapes and cast (the CPU draw moved to CUDA)
    assert [(n.shape, n.dtype, n.device) for n in noises] == [
        (r.shape, r.dtype, r.device) for r in references]
    pieces = flat.split([r.numel() for r in references])
    for noise, piece, reference in zip(noises, pieces, references):
        assert torch.equal(noise.cpu(), piece.to(reference.dtype).view(reference.shape))


def test_a_key_stream_hides_its_key_and_refuses_to_be_saved():
    # Prepare
    stream = KeyStream(KEY)

    # Execute / Assert
    assert KEY.hex() not in repr(stream)
    with pytest.raises(TypeError, match="never saved"):
        pickle.dumps(stream)
    with pytest.raises(TypeError, match="never saved"):
        torch.save(stream, "/dev/null")


def test_the_stream_moves_to_the_next_nonce_before_its_block_counter_wraps(monkeypatch):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    # Prepare: a nonce's stream cut to 128 bytes, so the move shows at small sizes
    monkeypatch.setattr(dp_random, "_BYTES_PER_NONCE", 128)
    stream = KeyStream(KEY)

    def chacha20(nonce: int, count: int) -> bytes:
        iv = bytes(4) + nonce.to_bytes(12, "little")
        return Cipher(algorithms.ChaCha20(KEY, iv), mode=None).encryptor().update(bytes(count))

    # Execute
    first, second = stream.read(100), stream.read(100)

    # Assert: the second read starts the second nonce's stream, none of it repeated
    assert first == chacha20(0, 100) and second == chacha20(1, 100)


# --------------------------------------------------------------------------------------------
# Opacus' DPOptimizer with our noise source


def noisy_step_gradient(noise, sigma: float, clip: float, size: int = 1000,
                        batch: int = 4) -> torch.Tensor:
    """The gradient Opacus' DPOptimizer makes from an all-zero per-example gradient: the noise
    alone, divided by the expected batch size."""
    param = torch.nn.Parameter(torch.zeros(size))
    optimizer = make_dp_optimizer(torch.optim.SGD([param], lr=0.0), sigma, clip, batch, noise)
    param.grad_sample = torch.zeros(batch, size)
    optimizer.pre_step()
    return param.grad * batch


def test_reproducible_opacus_noise_comes_from_our_generator_and_not_the_global_rng():
    # Prepare
    sigma, clip = 1.3, 0.7
    global_state = torch.get_rng_state()

    # Execute
    noise = noisy_step_gradient(torch.Generator().manual_seed(11), sigma, clip)
    expected = sigma * clip * torch.normal(0.0, 1.0, (1000,),
                                           generator=torch.Generator().manual_seed(11))

    # Assert
    assert torch.allclose(noise, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_secret_dp_sgd_noise_is_the_key_streams_hardened_draw():
    # Prepare
    sigma, clip, size = 1.3, 0.7, 100_000
    global_state = torch.get_rng_state()

    # Execute
    noise = noisy_step_gradient(KeyStream(KEY), sigma, clip, size=size)
    twin = KeyStream(KEY).normal(sigma * clip, (size,))

    # Assert: all of it from the stream (float32 rounding of the mean's division aside),
    # std sigma C (relative standard error of 1e5 draws: 0.22 %), the global RNG untouched
    assert torch.allclose(noise, twin, rtol=1e-5, atol=1e-6)
    assert abs(noise.std().item() / (sigma * clip) - 1) < 0.01
    assert torch.equal(torch.get_rng_state(), global_state)


def test_secret_dp_sgd_noises_every_tensor_once_per_step():
    # Prepare: two tensors, two steps
    params = [torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = make_dp_optimizer(torch.optim.SGD(params, lr=1.0), 1.0, 1.0, 2, KeyStream(KEY))
    twin = KeyStream(KEY)
    updates = []

    # Execute
    for _ in range(2):
        before = [p.detach().clone() for p in params]
        for param in params:
            param.grad_sample = torch.zeros(2, *param.shape)
        optimizer.step()
        optimizer.zero_grad()
        updates.append([(b - p.detach()) * 2 for b, p in zip(before, params)])  # lr 1, batch 2

    # Assert: step t's noise is the stream's t-th draw over both tensors, in order
    for update in updates:
        expected = twin.normal_like(1.0, [p.detach() for p in params])
        for got, want in zip(update, expected):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_make_dp_optimizer_refuses_to_fall_back_on_the_global_rng():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="needs a KeyStream or a torch.Generator"):
        make_dp_optimizer(torch.optim.SGD([param], lr=0.1), 1.0, 1.0, 4, None)


def test_reproducible_mode_draws_what_fedlora_clients_always_drew():
    """The streams of earlier fedlora versions (a rerun of an old simulation gives its numbers):
    the Poisson sample from ``random.Random(client seed)``, DP-SGD's noise from the global
    torch RNG seeded with it, Fed-SB's init noise from a fresh generator seeded with it."""
    # Prepare: the client seed as fedlora's ClientSetup wrote it before this module existed
    old_seed = (SEED * 1_000_003 + ROUND) * 1_000_003 + PARTITION
    saved = torch.get_rng_state()

    # Execute
    sample = poisson_sample(dp_rng("reproducible", "poisson", seed=SEED,
                                   server_round=ROUND, partition_id=PARTITION))
    noise = torch.randn(50, generator=dp_rng("reproducible", "noise", seed=SEED,
                                             server_round=ROUND, partition_id=PARTITION))
    torch.manual_seed(old_seed)
    global_noise = torch.randn(50)  # what Opacus drew without a generator
    init_noise = torch.randn(50, generator=dp_rng("reproducible", "init-noise", seed=SEED,
                                                  server_round=ROUND, partition_id=PARTITION))
    torch.set_rng_state(saved)

    # Assert
    assert sample == poisson_sample(random.Random(old_seed))
    assert torch.equal(noise, global_noise)
    assert torch.equal(init_noise, torch.randn(50, generator=torch.Generator().manual_seed(old_seed)))
