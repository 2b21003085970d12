"""The randomness of a DP release: secret from the server, or reproducible for simulation.

Why a secret. DP-SGD's guarantee holds against anyone who sees the released update but not
the randomness that made it: which examples the Poisson sample took, and the Gaussian noise.
If a client draws them from a seed the server knows (the run seed, the round, the partition
id), the server replays the draw, knows the sample and subtracts the noise exactly: the update
is then the noiseless clipped sum and the guarantee is void. So in ``"secret"`` mode each node
holds a :class:`NodeSecret`, 32 bytes from ``os.urandom`` (the operating system's CSPRNG),
created on the node and kept in its ``Context.state`` (never sent, never derived from anything
the server knows). Every use derives its own stream with HMAC-SHA256 of ``purpose/counter``
under that key, so two uses never share a stream; the counter is a per-node use count kept
with the secret (``next_counter``), not the round number, because a round may be retried on
other inputs (a lost reply, a server restart), and the same noise on two inputs cancels in
their difference. A node that loses its state draws a new secret: fresh randomness costs
nothing in privacy.

* Poisson sampling: :func:`secret_random`, a ``random.Random`` whose bits come from a keyed
  BLAKE2b counter-mode stream (a CSPRNG: its outputs say nothing about its key or its other
  outputs, unlike the Mersenne Twister's, whose state 624 outputs reveal).
* Gaussian noise: :func:`secret_torch_generator`, a ``torch.Generator`` seeded with 64 bits of
  the keyed hash, given to Opacus' ``DPOptimizer`` (:func:`make_dp_optimizer`), which then
  draws all its noise from it and never from the global torch RNG. The seed has 64 bits
  because that is what ``torch.Generator.manual_seed`` takes: guessing it costs the server
  2^63 noise draws per release on average.

``"reproducible"`` mode (simulation only, and *not* private against whoever runs the server):
the streams fedlora's clients have always drawn, from the client seed
``(seed * 1_000_003 + round) * 1_000_003 + partition id`` (:func:`client_seed`), so a
simulation reruns bit for bit and gives the numbers of earlier fedlora versions: the Poisson
samplers are ``random.Random(client seed)``; the training noise comes from the process's
default torch generator of the device, seeded with the client seed (the generator dropout
masks draw from as well: sharing it is what keeps the old draws); Fed-SB's init noise from a
fresh generator with the client seed. :func:`dp_rng` is the one entry point that picks
between the two modes.

Opacus 1.6 (``opacus/optimizers/optimizer.py``): ``DPOptimizer(..., generator=g)`` passes
``g`` to every ``torch.normal`` call in ``_generate_noise``; with ``generator=None`` those
calls use the global torch RNG (today's behaviour, seeded from the run seed).
``secure_mode=True`` makes ``_generate_noise`` draw one throw-away normal and then sum four
normals of std ``s`` and halve the sum (std ``s`` again): the ``2n``-sample fix (n = 2) of
Holohan & Braghin, arXiv:2107.10138, against floating-point attacks on the Gaussian sampler
(Jin et al., arXiv:2112.05307), which would otherwise let an observer tell from the low bits
of a noised value which of two neighbouring inputs produced it. Used through ``DPOptimizer``
directly, secure mode needs no ``torchcsprng``: only ``PrivacyEngine(secure_mode=True)``
imports it, to build a ``/dev/urandom`` generator, which the node secret replaces here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from functools import lru_cache

import torch

SECRET_BYTES = 32
STATE_KEY = "dp-node-secret"  # a ConfigRecord in the node's Context.state (bytes are allowed)
NOISE_MODES = ("secret", "reproducible")
PURPOSES = ("poisson", "noise", "init-poisson", "init-noise")  # the uses fedlora makes


class NodeSecret:
    """A node's DP key: 32 bytes from the OS CSPRNG. Its ``repr`` hides the key (logs)."""

    __slots__ = ("key",)

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) != SECRET_BYTES:
            raise ValueError(f"a node secret is {SECRET_BYTES} bytes, got {type(key).__name__} "
                             f"of length {len(key) if hasattr(key, '__len__') else '?'}")
        self.key = key

    @classmethod
    def generate(cls) -> "NodeSecret":
        return cls(os.urandom(SECRET_BYTES))

    def __eq__(self, other) -> bool:
        return isinstance(other, NodeSecret) and hmac.compare_digest(self.key, other.key)

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return "NodeSecret(<hidden>)"


def node_secret(state) -> NodeSecret:
    """This node's secret from its ``Context.state`` (a ``RecordDict``), created there on first
    use. The record also holds the node's use counter (see :func:`next_counter`)."""
    from flwr.app import ConfigRecord

    if STATE_KEY not in state.config_records:
        state[STATE_KEY] = ConfigRecord({"key": NodeSecret.generate().key, "uses": 0})
    return NodeSecret(bytes(state.config_records[STATE_KEY]["key"]))


def next_counter(state) -> int:
    """A number this node has never used with its secret (0, 1, 2, ...), kept in the state."""
    node_secret(state)
    record = state.config_records[STATE_KEY]
    counter = int(record["uses"])
    record["uses"] = counter + 1
    return counter


def _derived_key(secret: NodeSecret, purpose: str, counter: int) -> bytes:
    _check_purpose(purpose)
    return hmac.new(secret.key, f"fedlora-dp/{purpose}/{int(counter)}".encode(),
                    hashlib.sha256).digest()


class KeyedRandom(random.Random):
    """``random.Random`` drawing its bits from BLAKE2b(key, block index): a counter-mode
    CSPRNG. Every ``random.Random`` method (``random``, ``sample``, ``shuffle``, ...) works on
    it; ``seed``, ``getstate`` and ``setstate`` are refused (the key is the state)."""

    def __init__(self, key: bytes):
        self._key = key
        self._block = 0
        self._buffer = b""
        super().__init__()  # calls seed(), which must not reset the key stream

    def seed(self, *args, **kwargs) -> None:
        if any(a is not None for a in args) or kwargs:  # __init__ calls seed(None)
            raise NotImplementedError("a KeyedRandom is seeded by its key only")

    def getstate(self):
        raise NotImplementedError("a KeyedRandom's state is its secret key")

    def setstate(self, state):
        raise NotImplementedError("a KeyedRandom's state is its secret key")

    def _bytes(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._buffer += hashlib.blake2b(self._block.to_bytes(8, "little"), key=self._key,
                                            digest_size=64).digest()
            self._block += 1
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        return out

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        value = int.from_bytes(self._bytes((k + 7) // 8), "little")
        return value >> ((k + 7) // 8 * 8 - k)

    def random(self) -> float:
        return self.getrandbits(53) * 2.0 ** -53  # 53 bits: every double in [0, 1) on the grid


def secret_random(secret: NodeSecret, purpose: str, counter: int) -> random.Random:
    """The Poisson sampler's stream for one use of the node's secret."""
    return KeyedRandom(_derived_key(secret, purpose, counter))


def _seed64(material: bytes) -> int:
    return int.from_bytes(material[:8], "little") >> 1  # manual_seed takes a non-negative int64


def secret_torch_generator(secret: NodeSecret, purpose: str, counter: int,
                           device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for one use of the node's secret (the noise)."""
    return torch.Generator(device=device).manual_seed(_seed64(_derived_key(secret, purpose, counter)))


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """One seed per (run, round, client): a client's batches and dropout masks, and in
    reproducible mode its DP draws (``fedlora.clients.app.ClientSetup``)."""
    return (int(seed) * 1_000_003 + int(server_round)) * 1_000_003 + int(partition_id)


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown randomness purpose {purpose!r}; one of {PURPOSES}")


def reproducible_random(purpose: str, seed: int, server_round: int,
                        partition_id: int) -> random.Random:
    """The Poisson stream from what the server knows: simulation's reproducible mode only."""
    _check_purpose(purpose)
    return random.Random(client_seed(seed, server_round, partition_id))


def _default_generator(device: str | torch.device) -> torch.Generator:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return torch.default_generator


def reproducible_torch_generator(purpose: str, seed: int, server_round: int, partition_id: int,
                                 device: str | torch.device = "cpu") -> torch.Generator:
    """The noise generator from what the server knows: simulation's reproducible mode only.

    ``"noise"`` (DP-SGD's) is the device's default generator re-seeded with the client seed,
    which the client has already seeded it with: the stream Opacus drew from when it was given
    no generator, dropout masks interleaved; the other purposes get a fresh generator."""
    _check_purpose(purpose)
    value = client_seed(seed, server_round, partition_id)
    if purpose == "noise":
        return _default_generator(device).manual_seed(value)
    return torch.Generator(device=device).manual_seed(value)


def dp_rng(mode: str, purpose: str, kind: str, *, state=None, seed: int | None = None,
           server_round: int | None = None, partition_id: int | None = None,
           device: str | torch.device = "cpu"):
    """The generator for one DP use: ``kind="python"`` gives a ``random.Random`` (Poisson
    sampling), ``kind="torch"`` a ``torch.Generator`` on ``device`` (noise).

    ``mode="secret"`` needs the node's ``state`` (its ``Context.state``) and spends one use of
    its counter; ``mode="reproducible"`` needs ``seed``, ``server_round`` and ``partition_id``."""
    if kind not in ("python", "torch"):
        raise ValueError(f"kind must be 'python' or 'torch', got {kind!r}")
    if mode == "secret":
        if state is None:
            raise ValueError("noise mode 'secret' needs the node's Context.state")
        secret, counter = node_secret(state), next_counter(state)
        if kind == "python":
            return secret_random(secret, purpose, counter)
        return secret_torch_generator(secret, purpose, counter, device)
    if mode == "reproducible":
        if seed is None or server_round is None or partition_id is None:
            raise ValueError("noise mode 'reproducible' needs seed, server_round and partition_id")
        if kind == "python":
            return reproducible_random(purpose, seed, server_round, partition_id)
        return reproducible_torch_generator(purpose, seed, server_round, partition_id, device)
    raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")


def make_dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, clip: float,
                      expected_batch_size: int, generator: torch.Generator,
                      secure_mode: bool):
    """Opacus' ``DPOptimizer`` (mean loss reduction) drawing all its noise from ``generator``.

    A generator is required: without one Opacus falls back on the global torch RNG, which the
    run seed makes predictable. ``secure_mode`` turns on Opacus' 2n-sample Gaussian (n = 2)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("make_dp_optimizer needs a torch.Generator (from dp_rng); without one "
                        "Opacus draws its noise from the global torch RNG")
    return _fp32_clipping_optimizer()(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
        expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
        secure_mode=bool(secure_mode))


@lru_cache(maxsize=1)
def _fp32_clipping_optimizer() -> type:
    """Opacus' ``DPOptimizer`` that makes every per-example gradient fp32 (the parameter's
    dtype) before it computes their norms. Under bf16 autocast Opacus' per-example gradients
    are bf16, and it would take their norms in bf16: a norm rounded down by up to 2^-8 gives a
    clip factor that leaves the example's gradient up to 0.4 % longer than C, beyond the
    sensitivity the accountant assumes. In fp32 the bound holds as it does without autocast;
    the gradients themselves may come from bf16 matmuls (any function of an example is fine,
    so long as what is released is clipped and noised exactly). Opacus casts each per-example
    gradient to the parameter's dtype after the norms anyway, so this costs nothing; for fp32
    gradients it changes nothing. (A class made on first use: importing Opacus takes seconds.)"""
    from opacus.optimizers import DPOptimizer

    class Fp32ClippingDPOptimizer(DPOptimizer):
        def clip_and_accumulate(self):
            for param in self.params:
                samples = param.grad_sample
                if isinstance(samples, list):  # several forward passes before one step
                    param.grad_sample = [s.to(param.dtype) for s in samples]
                elif samples is not None and samples.dtype != param.dtype:
                    param.grad_sample = samples.to(param.dtype)
            super().clip_and_accumulate()

    return Fp32ClippingDPOptimizer


def gaussian_noise(std: float, shape, generator: torch.Generator, secure_mode: bool) -> torch.Tensor:
    """``N(0, std^2)`` of ``shape`` from ``generator`` on its device, as Opacus' DPOptimizer
    draws it: with ``secure_mode``, Opacus' own 2n-sample draw (``_generate_noise``), so a
    release outside the optimiser (Fed-SB's init gradient) gets the same protection; without,
    ``std * randn`` (the draw fedlora's init release has always made)."""
    if not secure_mode:
        return std * torch.randn(tuple(shape), generator=generator, device=generator.device)
    from opacus.optimizers.optimizer import _generate_noise

    reference = torch.empty(tuple(shape), device=generator.device)
    return _generate_noise(std, reference, generator=generator, secure_mode=True)
