"""The randomness of a DP release: secret from the server, or reproducible for simulation.

Why a secret. DP-SGD's guarantee holds against anyone who sees the released update but not
the randomness that made it: which examples the Poisson sample took, and the Gaussian noise.
If a client draws them from a seed the server knows (the run seed, the round, the partition
id), the server replays the draw, knows the sample and subtracts the noise exactly: the update
is then the noiseless clipped sum and the guarantee is void. So in ``"secret"`` mode each node
holds a :class:`NodeSecret`, 32 bytes from ``os.urandom`` (the operating system's CSPRNG),
created on the node and kept in its ``Context.state`` (never sent, never derived from anything
the server knows). Every use derives its own 256-bit key with HMAC-SHA256 of
``purpose/counter`` under that secret, so two uses never share a stream; the counter is a
per-node use count kept with the secret (``next_counter``), not the round number, because a
round may be retried on other inputs (a lost reply, a server restart), and the same noise on
two inputs cancels in their difference. A node that loses its state draws a new secret: fresh
randomness costs nothing in privacy.

One source for every secret draw: :class:`KeyStream`, the keystream of ChaCha20 (RFC 8439,
through ``cryptography``) under a 256-bit key. Every bit of the key changes the whole stream,
and its outputs say nothing about the key or about each other. (The ``torch.Generator`` this
module used before takes a 64-bit seed, but its CPU Mersenne Twister keeps only the low 32
bits of it: a server could try all 2^32 seeds, find the noise and subtract it.)

* Poisson sampling: :class:`KeyedRandom`, a ``random.Random`` whose bits are the keystream
  (so the samplers keep ``random.Random``'s interface; before, a BLAKE2b counter-mode stream,
  also a CSPRNG: moved onto ChaCha20 so that one construction is audited, not two).
* Gaussian noise (DP-SGD's, Fed-SB's init release, and on the server client-level DP's update
  and adaptive-clipping count noise): :meth:`KeyStream.normal`. 53-bit uniforms (the top 53
  bits of each 64-bit word, on the open grid ``(k + 1/2) 2^-53``) -> Box-Muller in float64 ->
  hardened against floating-point attacks on Gaussian samplers (Mironov, CCS 2012; Jin et al.,
  arXiv:2112.05307) as Opacus' ``secure_mode`` does: each coordinate is the sum of four
  independent draws of std ``s``, halved (std ``s`` again; Holohan & Braghin's ``2n``-sample
  fix with n = 2, arXiv:2107.10138), summed in float64 and only then cast to the tensor's
  dtype and moved to its device. The draw happens on the CPU for CUDA tensors too.
* DP-SGD: :func:`make_dp_optimizer` gives Opacus' ``DPOptimizer`` a subclass whose
  ``add_noise`` draws every trained tensor's noise from the key stream in one go (Opacus'
  own ``_generate_noise`` takes only a ``torch.Generator``).
* The server's draws (client-level DP's noise, its Poisson client sample) use
  :meth:`KeyStream.from_os`: a key from ``os.urandom`` held in memory only. A key stream
  cannot be pickled, so no checkpoint can hold it: a resumed run draws fresh randomness.

``"reproducible"`` mode (simulation only, and *not* private against whoever runs the server):
the streams fedlora's clients have always drawn, from the client seed
``(seed * 1_000_003 + round) * 1_000_003 + partition id`` (:func:`client_seed`), so a
simulation reruns bit for bit and gives the numbers of earlier fedlora versions: the Poisson
samplers are ``random.Random(client seed)``; the training noise comes from the process's
default torch generator of the device, seeded with the client seed (the generator dropout
masks draw from as well: sharing it is what keeps the old draws), through Opacus' own
``DPOptimizer(generator=...)``; Fed-SB's init noise from a fresh generator with the client
seed. :func:`dp_rng` is the one entry point that picks between the two modes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import random

import numpy as np
import torch

SECRET_BYTES = 32
STATE_KEY = "dp-node-secret"  # a ConfigRecord in the node's Context.state (bytes are allowed)
NOISE_MODES = ("secret", "reproducible")
PURPOSES = ("poisson", "noise", "init-poisson", "init-noise")  # the uses fedlora makes
KEY_BYTES = 32  # ChaCha20's key: 256 bits
HARDENING_DRAWS = 4  # Gaussians summed per coordinate (Opacus' secure_mode: 2n with n = 2)
# RFC 8439's nonce layout (cryptography's 16-byte "nonce"): a 32-bit block counter, then a
# 96-bit nonce. One nonce covers 2^32 blocks of 64 bytes; the stream then moves to the next.
_BYTES_PER_NONCE = 64 << 32
_PIECE = 8192  # coordinates of noise drawn at a time: 256 KiB of keystream, in the CPU's cache


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


class KeyStream:
    """ChaCha20's keystream under a 256-bit key (RFC 8439), and the DP draws made from it.

    ``read`` gives raw bytes, ``uniform`` 53-bit uniforms on ``(0, 1)``, ``standard_normal``
    Box-Muller Gaussians (float64), ``normal`` and ``normal_like`` the hardened noise a release
    adds. Draws are consecutive pieces of one stream: a node replays them from the key, nobody
    else can. Its ``repr`` hides the key, and it refuses to be pickled (a checkpoint never
    holds it)."""

    __slots__ = ("_key", "_nonce", "_left", "_encryptor")

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a key stream's key is {KEY_BYTES} bytes, got {type(key).__name__} "
                             f"of length {len(key) if hasattr(key, '__len__') else '?'}")
        self._key = key
        self._nonce = -1
        self._next_nonce()

    @classmethod
    def from_os(cls) -> "KeyStream":
        """A stream under a fresh key from the OS CSPRNG, held in this process only (the
        server's draws: nothing else ever needs to replay them)."""
        return cls(os.urandom(KEY_BYTES))

    def _next_nonce(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        self._nonce += 1
        nonce = bytes(4) + self._nonce.to_bytes(12, "little")  # block counter 0, then the nonce
        self._encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        self._left = _BYTES_PER_NONCE

    def read(self, count: int) -> bytes:
        """The next ``count`` bytes of the keystream (ChaCha20 applied to zeros)."""
        if not 0 <= count <= _BYTES_PER_NONCE:
            raise ValueError(f"one read takes 0 to {_BYTES_PER_NONCE} bytes, got {count}")
        if count > self._left:  # a block counter never wraps: the next nonce's stream instead
            self._next_nonce()
        self._left -= count
        return self._encryptor.update(bytes(count))

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` independent uniforms on ``(0, 1)`` (float64): the top 53 bits ``k`` of
        each 64-bit word as ``(k + 1/2) 2^-53``, never 0 or 1 (Box-Muller takes a log)."""
        words = np.frombuffer(self.read(8 * count), dtype="<u8")
        uniforms = (words >> np.uint64(11)).astype(np.float64)
        uniforms += 0.5
        uniforms *= 2.0 ** -53
        return torch.from_numpy(uniforms)

    def standard_normal(self, count: int) -> torch.Tensor:
        """``count`` independent N(0, 1) draws (float64, Box-Muller: both outputs of a pair)."""
        pairs = (count + 1) // 2
        uniforms = self.uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log(uniforms[:pairs]))
        angle = (2.0 * math.pi) * uniforms[pairs:]
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]

    def normal(self, std: float, shape, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """Hardened ``N(0, std^2)`` noise of ``shape``: per coordinate the sum of
        ``HARDENING_DRAWS`` standard draws times ``std / sqrt(HARDENING_DRAWS)`` (Opacus'
        secure_mode), computed in float64 on the CPU, then cast to ``dtype`` on ``device``.
        Drawn in pieces of ``_PIECE`` coordinates, whose draws stay in the CPU's cache."""
        shape = tuple(int(size) for size in shape)
        if std == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        noise = torch.empty(math.prod(shape), dtype=torch.float64)
        for piece in noise.split(_PIECE):
            draws = self.standard_normal(HARDENING_DRAWS * piece.numel())
            torch.sum(draws.view(HARDENING_DRAWS, piece.numel()), 0, out=piece)
        noise *= float(std) / math.sqrt(HARDENING_DRAWS)
        return noise.view(shape).to(dtype=dtype, device=device)

    def normal_like(self, std: float, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """``normal(std, ...)`` for each tensor of ``references`` (its shape, dtype and
        device), drawn in one piece (one DP-SGD step noises every trained tensor)."""
        sizes = [reference.numel() for reference in references]
        flat = self.normal(std, (sum(sizes),), torch.float64)
        return [piece.view(reference.shape).to(dtype=reference.dtype, device=reference.device)
                for piece, reference in zip(flat.split(sizes), references)]

    def __repr__(self) -> str:
        return "KeyStream(<hidden>)"

    def __reduce__(self):
        raise TypeError("a KeyStream holds a secret key and is never saved: whoever reads the "
                        "file could replay the noise (a resumed run draws fresh randomness)")


class KeyedRandom(random.Random):
    """``random.Random`` drawing its bits from a :class:`KeyStream` under ``key`` (the Poisson
    samplers' interface, on the same CSPRNG as the noise). Every ``random.Random`` method
    (``random``, ``sample``, ``shuffle``, ...) works on it; ``seed``, ``getstate`` and
    ``setstate`` are refused (the key is the state)."""

    _CHUNK = 4096  # keystream bytes read at a time (a Poisson sample reads 8 per example)

    def __init__(self, key: bytes):
        self._stream = KeyStream(key)
        self._buffer = b""
        self._offset = 0
        super().__init__()  # calls seed(), which must not reset the key stream

    def seed(self, *args, **kwargs) -> None:
        if any(a is not None for a in args) or kwargs:  # __init__ calls seed(None)
            raise NotImplementedError("a KeyedRandom is seeded by its key only")

    def getstate(self):
        raise NotImplementedError("a KeyedRandom's state is its secret key")

    def setstate(self, state):
        raise NotImplementedError("a KeyedRandom's state is its secret key")

    def _bytes(self, count: int) -> bytes:
        if self._offset + count > len(self._buffer):
            self._buffer = (self._buffer[self._offset:]
                            + self._stream.read(max(self._CHUNK, count)))
            self._offset = 0
        out = self._buffer[self._offset:self._offset + count]
        self._offset += count
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


def secret_noise(secret: NodeSecret, purpose: str, counter: int) -> KeyStream:
    """The noise's key stream for one use of the node's secret."""
    return KeyStream(_derived_key(secret, purpose, counter))


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


def dp_rng(mode: str, purpose: str, *, state=None, seed: int | None = None,
           server_round: int | None = None, partition_id: int | None = None,
           device: str | torch.device = "cpu"):
    """The source of one DP use (``PURPOSES``): for a Poisson sample (``"poisson"``,
    ``"init-poisson"``) a ``random.Random``; for noise (``"noise"``, ``"init-noise"``) a
    :class:`KeyStream` in secret mode, a ``torch.Generator`` on ``device`` in reproducible mode.

    ``mode="secret"`` needs the node's ``state`` (its ``Context.state``) and spends one use of
    its counter; ``mode="reproducible"`` needs ``seed``, ``server_round`` and ``partition_id``."""
    _check_purpose(purpose)
    sampler = purpose.endswith("poisson")
    if mode == "secret":
        if state is None:
            raise ValueError("noise mode 'secret' needs the node's Context.state")
        secret, counter = node_secret(state), next_counter(state)
        return (secret_random if sampler else secret_noise)(secret, purpose, counter)
    if mode == "reproducible":
        if seed is None or server_round is None or partition_id is None:
            raise ValueError("noise mode 'reproducible' needs seed, server_round and partition_id")
        if sampler:
            return reproducible_random(purpose, seed, server_round, partition_id)
        return reproducible_torch_generator(purpose, seed, server_round, partition_id, device)
    raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")


def make_dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, clip: float,
                      expected_batch_size: int, noise: "KeyStream | torch.Generator"):
    """Opacus' ``DPOptimizer`` (mean loss reduction) drawing all its noise from ``noise``: a
    :class:`KeyStream` (secret mode: hardened draws, :func:`_key_stream_dp_optimizer`), or a
    ``torch.Generator`` (reproducible mode: Opacus' own draws from it, as always).

    A source is required: without one Opacus falls back on the global torch RNG, which the run
    seed makes predictable."""
    settings = {"noise_multiplier": noise_multiplier, "max_grad_norm": clip,
                "expected_batch_size": expected_batch_size, "loss_reduction": "mean"}
    if isinstance(noise, KeyStream):
        return _key_stream_dp_optimizer()(optimizer, noise, **settings)
    if isinstance(noise, torch.Generator):
        return _fp32_clipping_optimizer()(optimizer, generator=noise, **settings)
    raise TypeError("make_dp_optimizer needs a KeyStream or a torch.Generator (from dp_rng); "
                    "without one Opacus draws its noise from the global torch RNG")


@functools.cache
def _key_stream_dp_optimizer() -> type:
    """Opacus' ``DPOptimizer`` with ``add_noise`` drawing from a :class:`KeyStream` (built on
    first use: importing Opacus takes seconds). Everything else (clipping, accumulation, the
    mean over the expected batch size, the step) is Opacus'."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class KeyStreamDPOptimizer(_fp32_clipping_optimizer()):
        def __init__(self, optimizer, noise_stream: KeyStream, **settings):
            super().__init__(optimizer, generator=None, secure_mode=False, **settings)
            self.noise_stream = noise_stream

        def add_noise(self) -> None:  # Opacus' add_noise, the draw replaced
            for param in self.params:
                _check_processed_flag(param.summed_grad)
            noises = self.noise_stream.normal_like(self.noise_multiplier * self.max_grad_norm,
                                                   [param.summed_grad for param in self.params])
            for param, noise in zip(self.params, noises):
                param.grad = (param.summed_grad + noise).view_as(param)
                _mark_as_processed(param.summed_grad)

    return KeyStreamDPOptimizer


@functools.cache
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
