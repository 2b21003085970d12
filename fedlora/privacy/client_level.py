"""Client-level DP: DP-FedAvg with fixed or adaptive clipping, as pure functions.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018): each round samples clients with probability ``q = clients_per_round / clients``
(Poisson), clips each sampled client's update (all trained tensors jointly) to L2 norm ``C``,
and releases ``(sum_k clip_C(delta_k) + N(0, sigma^2 C^2 I)) / m`` with the *fixed*
denominator ``m = q N`` (the expected number of clients). One client changes the sum by at
most ``C``, so each round is one Poisson-sampled Gaussian mechanism on the set of clients,
and the run's epsilon is ``fedlora.privacy.accounting``'s accounting with steps = rounds and sample rate
``q``: the unit of privacy is a client's whole data set.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, Algorithm 1): each sampled client also has a bit ``b_k = 1[||delta_k|| <= C]``;
the server releases the noised sum of the *shifted* bits, ``b~ = (sum_k (b_k - 1/2) +
N(0, sigma_b^2)) / m + 1/2``, and moves C geometrically, ``C <- C exp(-eta_C (b~ - gamma))``,
toward the ``gamma`` quantile of the update norms (the fraction ``gamma`` of updates
unclipped). The shift is what makes the count's sensitivity 1/2: adding or removing a client
moves ``sum_k (b_k - 1/2)`` by exactly 1/2 (unshifted bits in {0, 1} move it by 1), as in
TF Privacy's ``QuantileEstimatorQuery``. Both queries touch the same clients, so they are
one Gaussian mechanism whose noise multiplier is ``(sigma_delta^-2 + (sigma_b / (1/2))^-2)^-1/2``;
the update query's noise is raised until that equals the planned ``sigma`` (their Theorem 1):
``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2``. ``privacy.json`` records sigma_delta,
sigma_b and the count's sensitivity for every release, so an accountant can compose the two
queries itself. Defaults as Andrew et al. and Flower: C_0 = 0.1, gamma = 0.5, eta_C = 0.2,
sigma_b = m / 20.

Why not Flower's wrappers. Flower 1.39 ships this as wrapper strategies
(``flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``,
maths in ``flwr.supercore.differential_privacy``). They cannot wrap fedlora's strategies:

1. They clip ``reply_arrays - current_arrays`` by zipping the reply's arrays with the arrays
   the wrapper was called with, by position (``zip(..., strict=True)``). fedlora's replies hold
   only the parts a method trains (Fed-SB: R; FFA-LoRA: B), not the full model sent, so the
   lists do not line up (an error, or a subtraction of unrelated tensors).
2. They add the noise (std ``sigma C / m``) to what the inner strategy's ``aggregate_train``
   returns. That is right only when the aggregate is the plain mean of the clipped updates;
   fedlora's aggregates are method maths on the updates: FedAvg's sample weights, FedSVD's SVD
   re-orthogonalisation, FedEx-LoRA's residual ``mean(B A) - mean(B) mean(A)`` computed from the
   *un-noised* updates and sent as is. The noise has to go on the mean of the clipped updates
   *before* the method maths (which are then post-processing): ``noised_mean`` here, called
   where the strategy averages.
3. The noise comes from NumPy's global RNG (seedable, not a CSPRNG); the adaptive count is
   divided by the number of replies, not by ``m`` (the number of participants is itself
   private under Poisson client sampling). Their count is of unshifted bits (sensitivity 1)
   while their noise split (``compute_adaptive_noise_params``) assumes sensitivity 1/2, so
   the epsilon they imply is too low (at 100 clients, 10 a round, a planned 8 is about 14.5).
4. Their adaptive update is the wrong way round: ``adaptive_clip_inputs_inplace`` returns
   True when the update *was clipped* and ``_geometric_update`` then applies Andrew et al.'s
   rule, written for the *unclipped* fraction, to it, so a C that clips everything shrinks
   further (tests/test_client_dp.py shows it running away from the quantile).

So the maths is implemented once here, and tested against Flower's functions where they
agree: the joint clipping (``compute_clip_model_update``), the noise std
(``compute_stdv``), the effective noise multiplier (``compute_adaptive_noise_params``) and
the geometric step (``_geometric_update``, fed the unclipped fraction).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from fedlora.privacy import accounting as privacy
from fedlora.privacy.randomness import KeyStream

# Andrew et al. (2021), section 3, and Flower's defaults
INITIAL_CLIP = 0.1
TARGET_QUANTILE = 0.5
CLIP_LEARNING_RATE = 0.2
COUNT_STDDEV_PER_CLIENT = 1 / 20  # sigma_b = expected clients / 20
# Adaptive clipping sums the bits shifted, b_k - 1/2 in {-1/2, 1/2} (Andrew et al., TF Privacy),
# so adding or removing one client moves the sum by 1/2, not 1.
COUNT_SHIFT = 0.5
COUNT_SENSITIVITY = max(1.0 - COUNT_SHIFT, COUNT_SHIFT)


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a client's update over all its trained tensors jointly (float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_update(delta: dict[str, torch.Tensor], clip: float
                ) -> tuple[dict[str, torch.Tensor], float]:
    """``(delta * min(1, C / ||delta||), ||delta||)``: the update scaled into the L2 ball of
    radius ``clip`` as one vector (McMahan et al.'s flat clipping), and its norm before."""
    if clip <= 0:
        raise ValueError(f"the clipping norm must be > 0, got {clip}")
    norm = update_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {key: tensor * factor for key, tensor in delta.items()}, norm


def noised_mean(clipped_updates: list[dict[str, torch.Tensor]], noise_multiplier: float,
                clip: float, expected_clients: float, generator: torch.Generator | KeyStream,
                weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """DP-FedAvg's release: ``(sum_k w_k u_k + N(0, (sigma C)^2 I)) / m`` per tensor.

    ``m`` (``expected_clients``) is fixed, not the number of updates: under Poisson client
    sampling that number depends on who took part, and dividing by it would make one client's
    presence change every coordinate by more than ``C / m``. ``weights`` (default 1) must lie in
    [0, 1]: a weight above 1 (e.g. FedAvg's ``n_k / mean n``) would let one client move the sum
    by ``w_k C``, beyond the noise's calibration; plain sample weights ``n_k / sum n`` cannot be
    used either, as their denominator depends on every participant's private data size.
    ``generator``: a ``KeyStream`` (secret: hardened draws) or a seeded ``torch.Generator``."""
    if not clipped_updates:
        raise ValueError("noised_mean needs at least one update (the noise alone is a release "
                         "too: pass the zero update of an absent round explicitly)")
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    weights = [1.0] * len(clipped_updates) if weights is None else [float(w) for w in weights]
    if len(weights) != len(clipped_updates) or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError("weights must be one per update, each in [0, 1] (the sensitivity C "
                         "assumes no client counts more than once)")
    keys = clipped_updates[0].keys()
    mean = {}
    for key in keys:
        total = sum(w * update[key] for w, update in zip(weights, clipped_updates))
        if noise_multiplier <= 0:
            noise = 0
        elif isinstance(generator, KeyStream):
            noise = generator.normal(noise_multiplier * clip, total.shape, total.dtype, total.device)
        else:
            noise = torch.normal(0.0, noise_multiplier * clip, size=total.shape,
                                 generator=generator, device=total.device, dtype=total.dtype)
        mean[key] = (total + noise) / expected_clients
    return mean


def noise_std_of_mean(noise_multiplier: float, clip: float, expected_clients: float) -> float:
    """The noise std per coordinate of the released mean: ``sigma C / m`` (Flower's
    ``compute_stdv``)."""
    return noise_multiplier * clip / expected_clients


# --------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)


def count_noise_multiplier(clipped_count_stddev: float) -> float:
    """The count query's noise multiplier: its noise std over its sensitivity,
    ``sigma_b / (1/2) = 2 sigma_b`` for the shifted bits ``AdaptiveClip`` sums."""
    return clipped_count_stddev / COUNT_SENSITIVITY


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update query's noise multiplier ``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2``
    that, with the count query's noise ``sigma_b`` (sensitivity 1/2), costs what one query at
    ``sigma`` costs (Andrew et al., Theorem 1). Needs ``sigma < 2 sigma_b``."""
    if noise_multiplier <= 0:
        return 0.0
    count_sigma = count_noise_multiplier(clipped_count_stddev)
    if noise_multiplier >= count_sigma:
        raise ValueError(f"noise multiplier {noise_multiplier} needs a clipped-count stddev above "
                         f"{noise_multiplier * COUNT_SENSITIVITY} (got {clipped_count_stddev}): "
                         "raise clipped_count_stddev or the number of clients per round")
    return (noise_multiplier ** -2 - count_sigma ** -2) ** -0.5


def effective_noise_multiplier(update_sigma: float, clipped_count_stddev: float) -> float:
    """The accounting noise multiplier of the update query at ``update_sigma`` together with
    the count query at ``clipped_count_stddev``: ``(sigma_delta^-2 + (2 sigma_b)^-2)^-1/2``."""
    if update_sigma <= 0:
        return 0.0
    return (update_sigma ** -2 + count_noise_multiplier(clipped_count_stddev) ** -2) ** -0.5


@dataclass
class AdaptiveClip:
    """The clipping norm of DP-FedAvg with adaptive clipping, and its update rule."""

    expected_clients: float
    clip: float = INITIAL_CLIP
    target_quantile: float = TARGET_QUANTILE  # gamma: the fraction of updates left unclipped
    learning_rate: float = CLIP_LEARNING_RATE  # eta_C
    clipped_count_stddev: float | None = None  # sigma_b; None: expected_clients / 20

    def __post_init__(self):
        if self.clipped_count_stddev is None:
            self.clipped_count_stddev = self.expected_clients * COUNT_STDDEV_PER_CLIENT
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if self.clip <= 0 or self.learning_rate <= 0 or self.expected_clients <= 0:
            raise ValueError("clip, learning_rate and expected_clients must be > 0")

    def unclipped_fraction(self, norms: list[float], generator: torch.Generator | KeyStream
                           ) -> float:
        """``b~ = (sum_k (1[norm_k <= C] - 1/2) + N(0, sigma_b^2)) / m + 1/2``: the private
        estimate of the fraction of updates the current C leaves unclipped. The bits are
        shifted by -1/2 before the noise so that one client moves the sum by at most
        ``COUNT_SENSITIVITY`` = 1/2; ``norms`` may be empty (a round nobody trained in releases
        noise too)."""
        count = sum((1.0 if norm <= self.clip else 0.0) - COUNT_SHIFT for norm in norms)
        if self.clipped_count_stddev <= 0:
            noise = 0.0
        elif isinstance(generator, KeyStream):
            noise = float(generator.normal(self.clipped_count_stddev, (1,), torch.float64))
        else:
            noise = float(torch.normal(0.0, self.clipped_count_stddev, (1,), generator=generator))
        return (count + noise) / self.expected_clients + COUNT_SHIFT

    def step(self, fraction: float) -> float:
        """``C <- C exp(-eta_C (b~ - gamma))``; returns the new C."""
        self.clip *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip

    def update(self, norms: list[float], generator: torch.Generator | KeyStream) -> float:
        """One round's update from the sampled clients' update norms (before clipping)."""
        return self.step(self.unclipped_fraction(norms, generator))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------
# Planning


def client_sample_rate(clients_per_round: int, total_clients: int) -> float:
    """The Poisson client-sampling rate ``q = m / N`` the accounting assumes."""
    if not 0 < clients_per_round <= total_clients:
        raise ValueError(f"clients_per_round must be in 1..{total_clients}, got {clients_per_round}")
    return clients_per_round / total_clients


def plan_client_noise_multiplier(target_epsilon: float, delta: float, clients_per_round: int,
                                 total_clients: int, rounds: int, accountant: str = "rdp") -> float:
    """The smallest sigma (to 0.01) whose ``rounds`` Poisson-sampled Gaussian releases at
    ``q = clients_per_round / total_clients`` spend at most ``target_epsilon`` at ``delta``
    (``fedlora.privacy.accounting.plan_noise_multiplier`` with one step per round). With adaptive
    clipping this is the *effective* sigma; the updates get ``update_noise_multiplier``."""
    rate = client_sample_rate(clients_per_round, total_clients)
    return privacy.plan_noise_multiplier(target_epsilon, delta, rate, rounds, accountant)


def clients_needed(target_epsilon: float, delta: float, rounds: int, total_clients: int,
                   clip: float, max_noise_std: float, accountant: str = "rdp") -> int | None:
    """The fewest clients per round whose planned noise keeps the std per coordinate of the
    mean, ``sigma(m) C / m``, at or below ``max_noise_std``; None if all ``total_clients`` do not.

    sigma grows with q = m / N but more slowly than m (amplification by sampling), so the std
    falls with m and a bisection over m finds the smallest."""
    def std(m: int) -> float:
        sigma = plan_client_noise_multiplier(target_epsilon, delta, m, total_clients, rounds,
                                             accountant)
        return noise_std_of_mean(sigma, clip, m)

    if std(total_clients) > max_noise_std:
        return None
    low, high = 0, total_clients  # std(high) fits; low does not (or is 0)
    while high - low > 1:
        middle = (low + high) // 2
        if std(middle) <= max_noise_std:
            high = middle
        else:
            low = middle
    return high


# --------------------------------------------------------------------------------------------
# The strategy's part (``dp.mode=client``): everything above, once per round, with its state.


class ClientLevelDP:
    """Server-side DP-FedAvg for any method: between validating the round's replies and the
    method's own aggregation, the clients' updates (the change of their trained tensors) are
    clipped, summed and noised into ONE pseudo-update ``x + (sum_k clip_C(delta_k) + N(0,
    sigma^2 C^2)) / m``, which the method then aggregates as its only client (post-processing:
    no method maths ever sees a single client's update, so LoRA-FAIR's correction and
    FedEx-LoRA's residual, which need per-client products, are zero under client-level DP).

    The server is trusted with the raw updates (as with Flower's ``ServerSide`` wrappers); the
    guarantee covers everyone who sees the released model. Clients are Poisson-sampled at
    ``q = clients_per_round / clients`` (``fedlora.aggregation.participation.ClientSampler.use_rate``), the
    rate the accountant assumes. A round in which no update arrived releases noise all the
    same (an unchanged model, or an unchanged C, would tell that nobody took part). A method's
    one-time set-up release (Fed-SB's gradient sums) is the same mechanism on the set-up
    clients' sums, charged as one more step. Nothing else about the clients is kept for the
    results: not how many took part, nor their update norms.

    Args:
        noise_multiplier: sigma (planned from the target epsilon, or given); with adaptive
            clipping it is the effective sigma of the update and count queries together.
        clip: C (adaptive: its starting value).
        adaptive: Andrew et al.'s clipping (a noised count of unclipped updates moves C).
        expected_clients: m = q N. sample_rate: q.
        delta, accountant: for the epsilon reported after every round.
        generator: the noise's source: a ``torch.Generator`` seeded from the run seed
            (``noise="reproducible"``), or a ``KeyStream`` under a key from the OS held in
            memory only (``"secret"``: never in a checkpoint; a resumed run draws afresh).
    """

    def __init__(self, noise_multiplier: float, clip: float, adaptive: bool,
                 expected_clients: float, sample_rate: float, delta: float, accountant: str,
                 generator: torch.Generator | KeyStream, target_epsilon: float | None = None,
                 noise: str = "reproducible"):
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.sample_rate = sample_rate
        self.delta, self.accountant, self.target_epsilon = delta, accountant, target_epsilon
        self.generator = generator
        self.noise = noise  # how ``generator`` was seeded: reproducible | secret
        self.fixed_clip = clip
        # sigma_b = m / 20 (Andrew et al.) needs sigma < 2 sigma_b; a small federation raises it.
        self.adaptive = AdaptiveClip(expected_clients, clip=clip, clipped_count_stddev=max(
            expected_clients * COUNT_STDDEV_PER_CLIENT, noise_multiplier)) if adaptive else None
        self.update_sigma = (update_noise_multiplier(noise_multiplier,
                                                     self.adaptive.clipped_count_stddev)
                             if adaptive else noise_multiplier)
        self.history: privacy.History = []  # (sigma, q, steps): one step per release
        self.releases: list[dict] = []  # each release's mechanism (``_charge``)

    @property
    def clip(self) -> float:
        return self.adaptive.clip if self.adaptive is not None else self.fixed_clip

    def private_update(self, current: dict[str, torch.Tensor], updates: list[dict],
                       server_round: int) -> dict[str, torch.Tensor]:
        """The round's one pseudo-update ``current + noised mean of the clipped deltas`` over
        the trained tensors ``current`` (their global values this round). ``updates`` may be
        empty: the release is then noise alone, and so is the count's."""
        clip = self.clip
        clipped, norms = [], []
        for update in updates:
            delta, norm = clip_update({k: update[k].double() - current[k].double() for k in update},
                                      clip)
            clipped.append(delta)
            norms.append(norm)
        if not clipped:  # the zero sum of nobody's updates, to which the noise is added
            clipped = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}]
        mean = noised_mean(clipped, self.update_sigma, clip, self.expected_clients, self.generator)
        if self.adaptive is not None:
            self.adaptive.update(norms, self.generator)
        self._charge("train", server_round, clip)
        return {k: (current[k].double() + mean[k]).to(current[k].dtype) for k in mean}

    def private_sum(self, sums: list[dict[str, torch.Tensor]], server_round: int = 0
                    ) -> dict[str, torch.Tensor]:
        """A set-up release: ``sum_k clip_C(s_k) + N(0, sigma^2 C^2)`` over the clients' sums
        (scale-free uses such as Fed-SB's sign(G) need no division)."""
        clipped = [clip_update({k: v.double() for k, v in tensors.items()}, self.fixed_clip)[0]
                   for tensors in sums]
        mean = noised_mean(clipped, self.noise_multiplier, self.fixed_clip, 1.0, self.generator)
        self._charge("init", server_round, self.fixed_clip)
        return {k: v.to(sums[0][k].dtype) for k, v in mean.items()}

    def _charge(self, kind: str, server_round: int, clip: float) -> None:
        """One Poisson-sampled release at the run's sigma, and what it was made of: the update
        query's noise multiplier and, with adaptive clipping in a training round, the count
        query's noise std and sensitivity (its noise multiplier is their ratio). An
        accountant composes ``Gaussian(update_noise_multiplier)`` with
        ``Gaussian(count_noise_stddev / count_sensitivity)`` under one Poisson sample at
        ``sample_rate``; fedlora's own history holds the single equivalent sigma."""
        self.history = privacy.add_steps(self.history, self.noise_multiplier, self.sample_rate, 1)
        counted = kind == "train" and self.adaptive is not None
        self.releases.append({
            "kind": kind, "round": server_round, "clip": clip, "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_sigma if kind == "train" else self.noise_multiplier,
            "count_noise_stddev": self.adaptive.clipped_count_stddev if counted else None,
            "count_sensitivity": COUNT_SENSITIVITY if counted else None})

    def epsilon(self) -> float:
        return privacy.epsilon_spent(self.history, self.delta, self.accountant)

    def max_epsilon(self) -> float:
        """The run's epsilon so far (one accountant for the whole federation)."""
        return self.epsilon()

    def report(self) -> dict:
        """``privacy.json`` under client-level DP: what any accountant needs to recompute, and
        nothing computed from the clients but through the noise."""
        return {"mode": "client", "noise": self.noise, "target_epsilon": self.target_epsilon,
                "accountant": self.accountant, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "update_noise_multiplier": self.update_sigma,
                "count_noise_stddev": (self.adaptive.clipped_count_stddev
                                       if self.adaptive is not None else None),
                "count_sensitivity": COUNT_SENSITIVITY if self.adaptive is not None else None,
                "sample_rate": self.sample_rate, "expected_clients": self.expected_clients,
                "clipping": "adaptive" if self.adaptive is not None else "fixed",
                "epsilon": self.epsilon(), "max_epsilon": self.epsilon(),
                "history": [list(entry) for entry in self.history], "releases": self.releases}

    def state_dict(self) -> dict:
        state = {"history": [list(e) for e in self.history], "releases": list(self.releases),
                 "adaptive": self.adaptive.state_dict() if self.adaptive is not None else None}
        if isinstance(self.generator, torch.Generator):  # reproducible: resume bit for bit
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(e) for e in state["history"]]
        self.releases = list(state["releases"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        if isinstance(self.generator, torch.Generator):  # a KeyStream has no saved state
            self.generator.set_state(state["generator"])


def client_level_dp(dp, *, clients: int, clients_per_round: int, rounds: int, seed: int,
                    setup_releases: int) -> ClientLevelDP:
    """The part for a run's ``dp`` section (``dp.mode=client``): sigma planned over the run's
    rounds plus the method's set-up releases, unless ``dp.noise_multiplier`` gives it."""
    rate = client_sample_rate(clients_per_round, clients)
    sigma = dp.noise_multiplier if dp.noise_multiplier is not None else plan_client_noise_multiplier(
        dp.epsilon, dp.delta, clients_per_round, clients, rounds + setup_releases, dp.accountant)
    # Reproducible (simulation's default): the run's seed, so reruns and resume are bit-exact.
    generator = (torch.Generator().manual_seed(seed * 1_000_003 + 17)
                 if dp.noise == "reproducible" else KeyStream.from_os())
    return ClientLevelDP(sigma, dp.clip, dp.clipping == "adaptive", rate * clients, rate,
                         dp.delta, dp.accountant, generator,
                         target_epsilon=dp.epsilon, noise=dp.noise)
