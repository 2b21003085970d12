"""Record-level DP-SGD on a client, with Opacus (ALGORITHMS.md, "Differential privacy").

What a DP client does differently from ``client_update``'s plain loop, all here:

* its noise multiplier sigma_k is planned on the node, from the target epsilon, delta_k and its
  own n_k, over the most steps it can take in the run
  (``fedlora.privacy.accounting.plan_noise_multiplier``; a set-up release counted), and kept in
  its ``Context.state``; a sigma in the server's message is never used (a node whose state was
  lost plans the same sigma again); the settings it plans from are within the node's own
  policy (``fedlora.clients.policy``), checked before any of this;
* its batches are Poisson samples of its own examples at rate ``q_k = b / n_k`` (possibly
  empty: DP-SGD still takes that step, pure noise);
* per message, the shared model is wrapped in Opacus' ``GradSampleModule`` (only the trained
  tensors require grad, so only they get per-example gradients) and the optimiser in a
  ``DPOptimizer`` (per-example clipping to C, Gaussian noise sigma_k C, Opacus' maths); the
  hooks and per-example attributes are removed afterwards, since the model is shared by the
  virtual clients of a Ray worker;
* its accountant (a history of ``(sigma, q, steps)``) and its release log (one entry per
  release: kind ``init``/``train``, round, sigma, q, steps; ``fedlora.privacy.accounting``) are kept in
  ``Context.state`` across rounds and reported in every reply; the server sends its own copy
  back, and the longer one wins, so a recreated client process never undercounts. A client
  whose next round would exceed the target declines (a metric, not an error).
* its randomness (the Poisson samples and every Gaussian noise draw) comes from
  ``fedlora.privacy.randomness.dp_rng`` in the mode the server's config names (``dp-noise``): a
  ChaCha20 key stream under a secret the node holds (hardened Gaussians), or (simulation) the
  seeds the server knows.
* a gradient sum of base weights (a method's set-up step, ``fedlora.clients.hooks``):
  per-example gradients clipped to C, summed, plus Gaussian noise sigma_k C
  (``private_gradient_sum``): one Poisson-sampled Gaussian release, charged to the same
  accountant.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord

from fedlora.privacy import accounting as privacy
from fedlora.clients.train import base_gradient_sum
from fedlora.privacy.randomness import NOISE_MODES, KeyStream, dp_rng, make_dp_optimizer
from fedlora.core.errors import ConfigError

STATE_KEY = "dp-accountant"


class ReleaseRefused(Exception):
    """A DP release this node will not make (nothing was sampled, noised or sent): the app
    answers the message with an error reply whose reason is this one line."""


@dataclass
class ClientPrivacy:
    """One client's DP settings and accountant for one message."""

    target_epsilon: float
    delta: float  # delta_k = min(dp.delta, 1 / n_k)
    clip: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    batch_size: int  # the expected Poisson batch q_k n_k = min(b, n_k): DP-SGD's mean divisor
    history: privacy.History = field(default_factory=list)
    releases: list[privacy.Release] = field(default_factory=list)
    noise: str = "secret"  # where its randomness comes from (fedlora.privacy.randomness.NOISE_MODES)
    noise_generator: KeyStream | torch.Generator | None = None  # DP-SGD's, per message (``rng``)

    @classmethod
    def for_node(cls, config: ConfigRecord, context_state, num_examples: int) -> "ClientPrivacy | None":
        """This node's privacy state (None without DP): the plan, and the longer of its own
        and the server's accountant history."""
        target = float(config.get("dp-epsilon", 0.0))
        if target <= 0:
            return None
        batch_size = int(config["batch-size"])
        delta = privacy.client_delta(float(config["dp-delta"]), num_examples)
        rate = privacy.sample_rate(batch_size, num_examples)
        init_share = int(config.get("dp-init-samples", 0))
        init_rate = privacy.sample_rate(init_share, num_examples) if init_share else 0.0
        accountant = str(config["dp-accountant"])
        own = context_state.config_records[STATE_KEY] if STATE_KEY in context_state.config_records else {}
        if "dp-noise-multiplier" in own:
            sigma = float(own["dp-noise-multiplier"])
        else:  # planned here from the run's settings and n_k; never a sigma the server sends
            sigma = privacy.plan_noise_multiplier(target, delta, rate, int(config["dp-max-steps"]),
                                                  accountant, init_rate)
        history = privacy.longer_history(privacy.history_from_record(own),
                                         privacy.history_from_record(config, prefix="dp-known-"))
        releases = privacy.longer_releases(
            privacy.releases_from_record(own) or [],
            privacy.releases_from_record(config, prefix="dp-known-release-") or [])
        noise = str(config.get("dp-noise", "secret"))  # no mode named: the safe one
        if noise not in NOISE_MODES:
            raise ValueError(f"dp-noise must be one of {NOISE_MODES}, got {noise!r}")
        return cls(target, delta, float(config["dp-clip"]), accountant, sigma, rate,
                   min(batch_size, num_examples), history, releases, noise)

    def rng(self, purpose: str, node, context_state, device: str = "cpu"):
        """The source of one DP use (``fedlora.privacy.randomness.PURPOSES``) in this client's
        noise mode: a ``random.Random`` for a Poisson sample; for noise a ``KeyStream``
        (secret) or a ``torch.Generator`` (reproducible). ``node``: the app's ``ClientSetup``
        (its config's seed and round, its partition id)."""
        return dp_rng(self.noise, purpose, state=context_state,
                      seed=int(node.config["seed"]),
                      server_round=int(node.config.get("server-round", 0)),
                      partition_id=node.partition_id, device=device)

    def epsilon(self, history: privacy.History | None = None) -> float:
        return privacy.epsilon_spent(self.history if history is None else history, self.delta,
                                     self.accountant)

    def can_afford(self, steps: int, rate: float | None = None) -> bool:
        """Whether ``steps`` more steps keep epsilon within the target."""
        projected = privacy.add_steps(self.history, self.noise_multiplier,
                                      self.sample_rate if rate is None else rate, steps)
        return self.epsilon(projected) <= self.target_epsilon * (1 + 1e-9)

    def check_setup_release(self, rate: float) -> None:
        """Raise ``ReleaseRefused`` unless this node may make a method's set-up release (one
        step at ``rate``) now: the first of the run (its release log has no ``init``; a server
        asking again would get it charged again, without end) and within the target epsilon."""
        if any(release["kind"] == "init" for release in self.releases):
            raise ReleaseRefused("DP: this node already made its set-up release in this run; "
                                 "it makes one per run, so nothing was released")
        if not self.can_afford(1, rate):
            raise ReleaseRefused(f"DP: the set-up release would take this node past "
                                 f"dp.epsilon={self.target_epsilon:g} (spent "
                                 f"{self.epsilon():.4g}), so nothing was released")

    def spend(self, steps: int, context_state, kind: str, server_round: int,
              rate: float | None = None) -> None:
        """Charge one release of ``steps`` steps (at the training rate, or ``rate``) of ``kind``
        (``init`` or ``train``) in ``server_round``; keep the history and the release log."""
        rate = self.sample_rate if rate is None else rate
        self.history = privacy.add_steps(self.history, self.noise_multiplier, rate, steps)
        self.releases = privacy.add_release(self.releases, kind, server_round,
                                            self.noise_multiplier, rate, steps)
        context_state[STATE_KEY] = ConfigRecord(
            {"dp-noise-multiplier": self.noise_multiplier, **privacy.history_to_record(self.history),
             **privacy.releases_to_record(self.releases)})

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """``(model, optimizer)`` wrapped for DP-SGD at this client's sigma_k, C and expected
        batch size, its noise drawn from ``noise_generator``, for ``client_update``'s loop
        (see ``private``)."""
        return private(model, optimizer, self.noise_multiplier, self.clip, self.batch_size,
                       self.noise_generator)

    @staticmethod
    def empty_step(optimizer, trainable: list[torch.nn.Parameter]) -> None:
        empty_step(optimizer, trainable)

    def noised_gradient(self, per_example: list[torch.Tensor]) -> list[torch.Tensor]:
        """One DP-SGD step's gradient of this client's trained tensors from their per-example
        gradients, as ``wrap``'s optimiser makes it (``dp_sgd_gradient``); for a client trained
        with others in one pass (``fedlora.clients.batched``)."""
        return dp_sgd_gradient(per_example, self.clip, self.noise_multiplier, self.batch_size,
                               self.noise_generator)

    def metrics(self) -> dict:
        """What the reply reports, for the server's ledger and ``privacy.json``: the release
        log whenever it accounts for every step of the history (a history carried over from an
        older server copy without a log is reported alone, never a log that undercounts)."""
        complete = privacy.release_steps(self.releases) == privacy.total_steps(self.history)
        return {"dp-noise-multiplier": self.noise_multiplier, "dp-sample-rate": self.sample_rate,
                "dp-delta": self.delta, "dp-epsilon": self.epsilon(),
                **privacy.history_to_record(self.history),
                **(privacy.releases_to_record(self.releases) if complete else {})}


def poisson_batches(batches, indices, rate: float, steps: int, rng: random.Random):
    """``steps`` batches, each holding every example of ``indices`` independently with
    probability ``rate`` (Poisson sampling, which the accountant assumes); None for an empty one."""
    for _ in range(steps):
        chosen = [i for i in indices if rng.random() < rate]
        yield batches.collate(chosen) if chosen else None


@contextmanager
def private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
            clip: float, expected_batch_size: int, noise: KeyStream | torch.Generator):
    """``(model, optimizer)`` wrapped for DP-SGD by Opacus for the duration of the block, all
    noise drawn from ``noise`` (``make_dp_optimizer``); the model comes back with no hooks and
    no per-example attributes (it is shared)."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_optimizer = make_dp_optimizer(optimizer, noise_multiplier, clip, expected_batch_size, noise)
    try:
        with warnings.catch_warnings():
            # Opacus' backward hook on the first adapted layer, whose input (frozen embeddings)
            # needs no gradient: PyTorch warns, but the hook gets the output gradient it needs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield wrapped, dp_optimizer
    finally:
        wrapped._close()  # removes the hooks and grad_sample attributes
        for param in model.parameters():
            for name in ("summed_grad", "_processed", "_forward_counter", "grad_sample"):
                if hasattr(param, name):
                    delattr(param, name)


def empty_step(optimizer, trainable: list[torch.nn.Parameter]) -> None:
    """DP-SGD's step for an empty Poisson batch: no example, so the update is the noise alone
    (skipping it would make the sampling, and the accounting, not Poisson)."""
    for param in trainable:
        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()


def dp_sgd_gradient(per_example: list[torch.Tensor], clip: float, noise_multiplier: float,
                    expected_batch_size: int, noise: KeyStream | torch.Generator) -> list[torch.Tensor]:
    """The gradient one DP-SGD step gives each trained tensor, from the per-example gradients
    of one client's batch (``per_example[j]``: ``[examples, *shape of tensor j]``, in the order
    of the client's optimiser; no example: an empty Poisson batch).

    Opacus' ``DPOptimizer`` step, operation for operation (what ``private`` runs, mean loss
    reduction): each example's gradient clipped to ``clip`` by its norm over all tensors
    (the norm of the tensors' norms, ``clip / (norm + 1e-6)`` capped at 1), summed, plus
    Gaussian noise of std ``noise_multiplier * clip`` drawn from ``noise`` tensor by tensor as
    the client's optimiser draws it (a ``KeyStream``: one hardened draw for all tensors; a
    ``torch.Generator``: Opacus' own draw per tensor), divided by the expected batch size."""
    first = per_example[0]
    if len(first) == 0:  # an empty batch: the noise alone
        factor = torch.zeros((0,), dtype=first.dtype, device=first.device)
    else:
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in per_example], dim=1)
        factor = (clip / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
    summed = [torch.einsum("i,i...", factor.to(g.dtype), g) for g in per_example]
    std = noise_multiplier * clip
    if isinstance(noise, KeyStream):
        noises = noise.normal_like(std, summed)
    elif isinstance(noise, torch.Generator):
        from opacus.optimizers.optimizer import _generate_noise

        noises = [_generate_noise(std, total, noise) for total in summed]
    else:
        raise TypeError("dp_sgd_gradient needs a KeyStream or a torch.Generator (from dp_rng)")
    return [(total + draw) / expected_batch_size for total, draw in zip(summed, noises)]


def private_gradient_sum(model: torch.nn.Module, weights: dict[str, torch.nn.Parameter], batches,
                         indices, clip: float, noise_multiplier: float,
                         noise: KeyStream | torch.Generator, device: str = "cpu",
                         loss=None) -> dict[str, torch.Tensor]:
    """``base_gradient_sum``'s DP release: ``sum_i clip_C(grad_W loss_i) + N(0, (sigma C)^2)``
    for each base weight W, with each example's gradient clipped jointly over all W.

    Example by example (a batch of one is exact: eval mode, no padding); a set-up step touches
    each client's data once, so per-example loops cost little. The noise comes from ``noise``
    (the sums are on the CPU): a ``KeyStream``'s hardened draw, or ``std * randn`` from a CPU
    ``torch.Generator`` (reproducible: the draw this release has always made). ``loss``: the
    task's (``base_gradient_sum``'s default otherwise)."""
    sums = {key: torch.zeros_like(w, device="cpu") for key, w in weights.items()}
    for index in indices:
        grads = base_gradient_sum(model, weights, [batches.collate([index])], device, loss=loss)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())).item()
        factor = min(1.0, clip / (norm + 1e-6))
        for key, grad in grads.items():
            sums[key] += factor * grad
    std = noise_multiplier * clip
    if isinstance(noise, KeyStream):
        return {key: total + noise.normal(std, total.shape) for key, total in sums.items()}
    return {key: total + std * torch.randn(tuple(total.shape), generator=noise, device=noise.device)
            for key, total in sums.items()}


def check_opacus_can_wrap(model: torch.nn.Module, model_name: str) -> None:
    """Raise a one-line ``ConfigError`` if Opacus cannot compute per-example gradients for the
    model's trainable layers (e.g. a trainable layer with buffers, or BatchNorm anywhere)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # as the clients wrap it (Opacus rejects a model in eval mode)
    errors = GradSampleModule.validate(model, strict=False) + ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        first = str(errors[0]).splitlines()[0]
        raise ConfigError(f"model='{model_name}' cannot be trained with DP-SGD: Opacus reports "
                          f"{len(errors)} problem(s), first: {first}; use dp=off or a model "
                          "without BatchNorm or trainable layers with buffers")
