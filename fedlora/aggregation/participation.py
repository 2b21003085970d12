"""Client participation: who takes part in each round, and FedAU's weights that correct for it.

FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
Federated Averaging", ICLR 2024, arXiv 2306.03401) estimates each client's inverse participation
probability online, as the running mean of the intervals between its participations, and the
server scales each delta by that weight while dividing by *all* N clients. This module holds
its estimator (:class:`FedAUWeights`) and the participation models it is evaluated under (its
server step ``x <- x + eta/N sum_k omega_k (x_k - x)`` is the shared delta rule,
``fedlora.aggregation.maths.server_step_weights`` with ``c_k = omega_k / N``), transcribed from the official code
(``IBM/fedau``: ``main.py`` for the estimator, ``util/util.py`` ``WorkerSampler`` and
``data_participation_each_node`` for the models and probabilities). Spec:
``docs/algorithms.md`` ("Client weighting", "Participation patterns", and the FedAU
invariant among "Invariants the test-suite checks").

Written by hand: no maintained library provides FedAU or its participation models (Flower's
strategies sample a fixed fraction uniformly). Clients are identified by their index
``0 .. num_clients - 1`` (the partition id), never by a Flower node id.

Every random draw comes from a generator seeded explicitly (``numpy.random.Generator``;
``random.Random`` for :class:`Uniform`), or for client-level DP's secret client sample from a
key stream (:class:`SecretBernoulli`); the global RNGs are never touched. A participation model called as ``active(0), active(1), ...`` yields
exactly the rows of ``matrix(num_rounds)`` of a model built with the same arguments, so the same
seed gives the same participation matrix. Everything that must survive a restart has a
JSON-serialisable ``state_dict()`` / ``load_state_dict()`` pair.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedlora.aggregation.maths import sample_weights
from fedlora.privacy.randomness import KeyStream

# --------------------------------------------------------------------------------------------
# FedAU: online weight estimator and server update


class FedAUWeights:
    """FedAU's per-client weight estimator (arXiv 2306.03401, Algorithm 1; ``IBM/fedau`` main.py).

    Per client n the server keeps ``rounds_absent`` (c_n: rounds since the last participation or
    the last cutoff reset), ``interval_sum`` (S_n) and ``interval_count`` (J_n) of the recorded
    participation intervals; all start at 0. Each round, for every client:

    * participating: its weight is ``omega_n = S_n / J_n`` (1 while ``J_n = 0``), computed from
      the intervals recorded *before* this round so that it is independent of this round's
      participation; then the interval just closed is recorded, ``S_n += c_n + 1``,
      ``J_n += 1``, ``c_n = 0``;
    * absent: ``c_n += 1``; with a cutoff K, once ``c_n >= K`` an interval K is recorded
      (``S_n += K``, ``J_n += 1``) and ``c_n = 0``.

    Under Bernoulli(p) participation the intervals are Geometric(p), so ``omega_n -> 1/p`` without
    a cutoff and ``omega_n -> (1 - (1-p)^K) / p`` with cutoff K; every weight lies in [1, K].

    Args:
        num_clients: N, the number of clients in the federation (participants or not).
        cutoff: K, the longest absence recorded as one interval; ``None`` (or ``math.inf``) for
            no cutoff. The official code's default 100000 is effectively no cutoff; its README
            also uses 50.
    """

    def __init__(self, num_clients: int, cutoff: int | None = None):
        if int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
        if cutoff is not None and cutoff == math.inf:
            cutoff = None
        if cutoff is not None and (int(cutoff) != cutoff or cutoff < 1):
            raise ValueError(f"fedau cutoff must be a positive integer or None (no cutoff), got {cutoff!r}")
        self.num_clients = int(num_clients)
        self.cutoff = None if cutoff is None else int(cutoff)
        self.rounds_seen = 0
        self.rounds_absent = np.zeros(self.num_clients, dtype=np.int64)    # c_n
        self.interval_sum = np.zeros(self.num_clients, dtype=np.int64)     # S_n
        self.interval_count = np.zeros(self.num_clients, dtype=np.int64)   # J_n

    def current_weights(self) -> np.ndarray:
        """omega_n for every client as it would be used if n participated in the next round."""
        counts = np.maximum(self.interval_count, 1)
        return np.where(self.interval_count > 0, self.interval_sum / counts, 1.0)

    def step(self, participants: Iterable[int]) -> dict[int, float]:
        """Advance one round; returns ``{client: omega}`` for this round's participants.

        Call it once per round, also for a round with no participants: every absent client's
        counter still advances (FedAU's estimator counts rounds, not replies).
        """
        participant_ids = [int(client) for client in participants]
        if len(set(participant_ids)) != len(participant_ids):
            raise ValueError(f"a client appears twice among this round's participants: {sorted(participant_ids)}")
        out_of_range = [c for c in participant_ids if not 0 <= c < self.num_clients]
        if out_of_range:
            raise ValueError(f"client ids {out_of_range} are outside 0..{self.num_clients - 1}")
        participating = np.zeros(self.num_clients, dtype=bool)
        participating[participant_ids] = True

        # Weights first, from intervals recorded before this round (FedAU, sec. 3.2).
        omega = self.current_weights()
        weights = {client: float(omega[client]) for client in participant_ids}

        # Participants close an interval of c_n + 1 rounds.
        self.interval_sum[participating] += self.rounds_absent[participating] + 1
        self.interval_count[participating] += 1
        self.rounds_absent[participating] = 0

        absent = ~participating
        self.rounds_absent[absent] += 1
        if self.cutoff is not None:
            # An absence of K rounds is recorded as an interval K (``k_value`` in IBM/fedau).
            cut = absent & (self.rounds_absent >= self.cutoff)
            self.interval_sum[cut] += self.cutoff
            self.interval_count[cut] += 1
            self.rounds_absent[cut] = 0

        self.rounds_seen += 1
        return weights

    def state_dict(self) -> dict:
        """Plain Python values (JSON-serialisable): part of the server checkpoint."""
        return {
            "num_clients": self.num_clients,
            "cutoff": self.cutoff,
            "rounds_seen": self.rounds_seen,
            "rounds_absent": self.rounds_absent.tolist(),
            "interval_sum": self.interval_sum.tolist(),
            "interval_count": self.interval_count.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the checkpoint must come from the same N and cutoff."""
        if state["num_clients"] != self.num_clients or state["cutoff"] != self.cutoff:
            raise ValueError(
                f"FedAU state is for num_clients={state['num_clients']}, cutoff={state['cutoff']}; "
                f"this estimator has num_clients={self.num_clients}, cutoff={self.cutoff}")
        arrays = {key: np.asarray(state[key], dtype=np.int64)
                  for key in ("rounds_absent", "interval_sum", "interval_count")}
        for key, values in arrays.items():
            if values.shape != (self.num_clients,):
                raise ValueError(f"FedAU state '{key}' has shape {values.shape}, expected ({self.num_clients},)")
        self.rounds_seen = int(state["rounds_seen"])
        self.rounds_absent = arrays["rounds_absent"]
        self.interval_sum = arrays["interval_sum"]
        self.interval_count = arrays["interval_count"]


# --------------------------------------------------------------------------------------------
# Participation probabilities correlated with the label mix


def participation_probabilities(label_histograms, seed: int, alpha_part: float = 0.1,
                                mean_p: float = 0.1, p_min: float = 0.02) -> np.ndarray:
    """FedAU's heterogeneous probabilities ``p_n = max(p_min, C * mean_p * <pi_n, v>)``.

    One draw ``v ~ Dirichlet(alpha_part * 1_C)`` favours some classes; ``pi_n`` is client n's
    normalised label histogram, so a client's participation correlates with its data, the
    setting where unweighted FedAvg is biased (``IBM/fedau`` util.py,
    ``data_participation_each_node``). When the clients' mean label mix is uniform the mean of
    ``C * mean_p * <pi_n, v>`` over clients is exactly ``mean_p``; the floor only raises it.

    Args:
        label_histograms: [clients, classes] label counts (or proportions) per client.
        seed: seeds the single Dirichlet draw.
        alpha_part: Dirichlet concentration of v (0.1 in the paper: a few favoured classes).
        mean_p: the mean participation probability p-bar (0.1 in the paper).
        p_min: the floor (0.02 in the paper); clients with an empty histogram get p_min.

    Returns:
        float64 array of N probabilities, each clipped to at most 1. With ``C * mean_p <= 1``
        (the paper: C = 10, p-bar = 0.1) the clip can never bind and this is the reference
        formula exactly.
    """
    histograms = np.asarray(label_histograms, dtype=np.float64)
    if histograms.ndim != 2 or histograms.shape[1] < 1:
        raise ValueError(f"label_histograms must be [clients, classes], got shape {histograms.shape}")
    if not np.all(np.isfinite(histograms)) or np.any(histograms < 0):
        raise ValueError("label_histograms must hold finite, non-negative counts")
    if alpha_part <= 0 or not 0 < mean_p <= 1 or not 0 <= p_min <= 1:
        raise ValueError(f"need alpha_part > 0, 0 < mean_p <= 1, 0 <= p_min <= 1; got "
                         f"alpha_part={alpha_part}, mean_p={mean_p}, p_min={p_min}")
    num_classes = histograms.shape[1]
    class_preference = np.random.default_rng(seed).dirichlet(alpha_part * np.ones(num_classes))
    totals = histograms.sum(axis=1)
    label_mix = np.divide(histograms, totals[:, None], out=np.zeros_like(histograms),
                          where=totals[:, None] > 0)
    raw = num_classes * mean_p * (label_mix @ class_preference)
    probabilities = np.maximum(p_min, raw)
    probabilities[totals == 0] = p_min
    return np.minimum(probabilities, 1.0)


def _checked_probabilities(probabilities) -> np.ndarray:
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 1 or values.size < 1:
        raise ValueError(f"probabilities must be a non-empty 1-D sequence, got shape {values.shape}")
    if not np.all((values > 0) & (values <= 1)):
        bad = values[~((values > 0) & (values <= 1))]
        raise ValueError(f"participation probabilities must lie in (0, 1], got {bad.tolist()}")
    return values


# --------------------------------------------------------------------------------------------
# Participation models


class ParticipationModel:
    """Common protocol: ``active(t)`` for t = 0, 1, 2, ... in order, ``matrix``, state round-trip.

    Subclasses set ``self.num_clients`` (and ``self.probabilities``) before calling
    ``ParticipationModel.__init__``, and implement ``_start(rng)`` (draw the initial state) and
    ``_advance(rng) -> bool mask`` (one round).
    """

    num_clients: int
    probabilities: np.ndarray
    _state_keys: tuple[str, ...] = ()

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._restart()

    def _restart(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.next_round = 0
        self._start(self._rng)

    def _start(self, rng: np.random.Generator) -> None:
        pass

    def _advance(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def active_mask(self, round_index: int) -> np.ndarray:
        """Boolean [clients] mask of the clients active in ``round_index`` (the next round)."""
        if round_index != self.next_round:
            raise ValueError(f"participation is drawn round by round: expected round {self.next_round}, "
                             f"got {round_index}")
        mask = self._advance(self._rng)
        self.next_round += 1
        return mask

    def active(self, round_index: int) -> list[int]:
        """Sorted ids of the clients active in ``round_index``; call for rounds 0, 1, 2, ..."""
        return np.flatnonzero(self.active_mask(round_index)).tolist()

    def matrix(self, num_rounds: int) -> np.ndarray:
        """Boolean [num_rounds, clients] matrix of rounds 0 .. num_rounds-1 from the seed.

        A replay from the start: it equals what ``active(0), ..., active(num_rounds - 1)`` give
        on a fresh model, and leaves this model's own position untouched.
        """
        replay = copy.deepcopy(self)
        replay._restart()
        out = np.zeros((num_rounds, self.num_clients), dtype=bool)
        for round_index in range(num_rounds):
            out[round_index] = replay.active_mask(round_index)
        return out

    def state_dict(self) -> dict:
        """Round number, RNG state and the model's own state, as JSON-serialisable values."""
        state = {"next_round": self.next_round, "rng": self._rng.bit_generator.state}
        for key in self._state_keys:
            state[key] = getattr(self, key).tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in self._state_keys:
            current = getattr(self, key)
            restored = np.asarray(state[key], dtype=current.dtype)
            if restored.shape != current.shape:
                raise ValueError(f"participation state '{key}' has shape {restored.shape}, "
                                 f"expected {current.shape}")
            setattr(self, key, restored)
        self._rng.bit_generator.state = state["rng"]
        self.next_round = int(state["next_round"])


class Bernoulli(ParticipationModel):
    """FedAU's Bernoulli model: ``I_n^t ~ Bernoulli(p_n)``, independent over clients and rounds."""

    def __init__(self, probabilities: Sequence[float], seed: int):
        self.probabilities = _checked_probabilities(probabilities)
        self.num_clients = self.probabilities.size
        super().__init__(seed)

    def _advance(self, rng: np.random.Generator) -> np.ndarray:
        return rng.random(self.num_clients) < self.probabilities


class SecretBernoulli(Bernoulli):
    """The Bernoulli model drawn from a ``KeyStream`` under a key from the OS held in this
    process only: client-level DP's Poisson sample of clients in secret mode, whose
    amplification assumes nobody outside learns it from a seed. It cannot be replayed
    (``matrix``) and saves no generator state: a restarted server draws afresh."""

    def __init__(self, probabilities: Sequence[float]):
        self._stream = KeyStream.from_os()
        super().__init__(probabilities, seed=0)

    def _restart(self) -> None:
        self._rng = None  # every draw comes from the key stream
        self.next_round = 0

    def _advance(self, rng) -> np.ndarray:
        return self._stream.uniform(self.num_clients).numpy() < self.probabilities

    def matrix(self, num_rounds: int) -> np.ndarray:
        raise ValueError("a secret participation sample cannot be replayed from a seed")

    def state_dict(self) -> dict:
        return {"next_round": self.next_round}

    def load_state_dict(self, state: dict) -> None:
        self.next_round = int(state["next_round"])


class Markov(ParticipationModel):
    """FedAU's Markovian model (``markov-a``): a two-state chain per client.

    ``P(inactive -> active) = a`` and ``P(active -> inactive) = b = a (1/p_n - 1)``, so the
    stationary active probability ``a / (a + b)`` is p_n; if ``b > 1`` then ``a <- a / b``,
    ``b <- 1`` (same ratio). The initial state is active with probability p_n; each round the
    chain transitions first and the new state is reported (``IBM/fedau`` util.py).

    Args:
        probabilities: p_n per client, in (0, 1].
        seed: RNG seed.
        a: the chain's activation probability (0.05 in the paper's ``markov-0.05``).
    """

    _state_keys = ("is_active",)

    def __init__(self, probabilities: Sequence[float], seed: int, a: float = 0.05):
        if not 0 < a <= 1:
            raise ValueError(f"markov activation probability a must lie in (0, 1], got {a}")
        self.probabilities = _checked_probabilities(probabilities)
        self.num_clients = self.probabilities.size
        to_inactive = a * (1.0 / self.probabilities - 1.0)
        too_large = to_inactive > 1
        self.to_active_probability = np.where(too_large, a / np.where(too_large, to_inactive, 1.0), a)
        self.to_inactive_probability = np.minimum(to_inactive, 1.0)
        super().__init__(seed)

    def _start(self, rng: np.random.Generator) -> None:
        self.is_active = rng.random(self.num_clients) < self.probabilities

    def _advance(self, rng: np.random.Generator) -> np.ndarray:
        draw = rng.random(self.num_clients)
        self.is_active = np.where(self.is_active, draw >= self.to_inactive_probability,
                                  draw < self.to_active_probability)
        return self.is_active.copy()


class Cyclic(ParticipationModel):
    """FedAU's cyclic model (``cyclic-L``): fixed active and inactive runs with a random phase.

    ``L_on = max(1, round(L p_n))`` active rounds alternate with ``L_off = max(1, L - L_on)``
    inactive ones (``round`` is numpy's, half to even, as in the reference). Each client starts
    inactive with a countdown drawn uniformly from ``{0, ..., L_off - 1}``; each round, if the
    countdown is 0 the state toggles and the countdown becomes the new state's run length, then
    the countdown decrements and the state is reported. The long-run rate is
    ``L_on / (L_on + L_off)``.

    Args:
        probabilities: p_n per client, in (0, 1].
        seed: RNG seed (only the phases are random).
        cycle_length: L (100 in the paper's ``cyclic-100``).
    """

    _state_keys = ("is_active", "rounds_to_switch")

    def __init__(self, probabilities: Sequence[float], seed: int, cycle_length: int = 100):
        if int(cycle_length) != cycle_length or cycle_length < 1:
            raise ValueError(f"cyclic cycle_length L must be a positive integer, got {cycle_length!r}")
        self.probabilities = _checked_probabilities(probabilities)
        self.num_clients = self.probabilities.size
        self.cycle_length = int(cycle_length)
        self.active_run = np.maximum(1, np.round(self.cycle_length * self.probabilities).astype(np.int64))
        self.inactive_run = np.maximum(1, self.cycle_length - self.active_run)
        super().__init__(seed)

    def _start(self, rng: np.random.Generator) -> None:
        self.is_active = np.zeros(self.num_clients, dtype=bool)
        self.rounds_to_switch = rng.integers(0, self.inactive_run).astype(np.int64)

    def _advance(self, rng: np.random.Generator) -> np.ndarray:
        switch = self.rounds_to_switch == 0
        self.is_active[switch] = ~self.is_active[switch]
        self.rounds_to_switch[switch] = np.where(self.is_active[switch], self.active_run[switch],
                                                 self.inactive_run[switch])
        self.rounds_to_switch -= 1
        return self.is_active.copy()


class Uniform(ParticipationModel):
    """fedlora's default: exactly ``per_round`` distinct clients per round, sampled uniformly
    without replacement, independently across rounds (Flower's FedAvg sampling).

    Its stream is Python's ``random.Random(seed)`` (``random.sample``), not numpy's: the one
    uniform sampler of the strategy, whose draws (the set-up round 0 included, and a smaller
    eligible set once DP clients decline, ``draw``) every recorded run reproduces.
    ``probabilities`` holds every client's participation rate ``per_round / num_clients``.
    """

    def __init__(self, num_clients: int, per_round: int, seed: int):
        if int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
        if int(per_round) != per_round or not 1 <= per_round <= num_clients:
            raise ValueError(f"per_round must be an integer in 1..{num_clients}, got {per_round!r}")
        self.num_clients = int(num_clients)
        self.per_round = int(per_round)
        self.probabilities = np.full(self.num_clients, self.per_round / self.num_clients)
        super().__init__(seed)

    def _restart(self) -> None:
        self._rng = random.Random(self.seed)
        self.next_round = 0

    def draw(self, eligible: Sequence[int]) -> list[int]:
        """``min(per_round, len(eligible))`` distinct ones of ``eligible`` (in its order's
        positions: the caller passes a fixed order), outside the round count of ``active``."""
        return self._rng.sample(list(eligible), min(self.per_round, len(eligible)))

    def _advance(self, rng) -> np.ndarray:
        mask = np.zeros(self.num_clients, dtype=bool)
        mask[self.draw(range(self.num_clients))] = True
        return mask

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"next_round": self.next_round, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.next_round = int(state["next_round"])


def write_participation_csv(path, matrix) -> None:
    """Write a participation matrix in wide format: header ``round,c0,c1,...``, then one row per
    round with 1 (active) or 0 (absent) per client."""
    active = np.asarray(matrix)
    if active.ndim != 2:
        raise ValueError(f"participation matrix must be [rounds, clients], got shape {active.shape}")
    lines = ["round," + ",".join(f"c{client}" for client in range(active.shape[1]))]
    for round_index, row in enumerate(active.astype(bool)):
        lines.append(f"{round_index}," + ",".join("1" if flag else "0" for flag in row))
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# The strategy's parts: who takes part in a round, and how much each reply weighs


class ClientSampler:
    """This round's clients, by partition id: ``clients_per_round`` of the eligible ones
    uniformly (``participation=uniform``, and always in the set-up round 0), or those the
    participation model marks active (bernoulli, markov, cyclic; possibly none). Keeps the
    partitions sampled in training rounds 1, 2, ... (``participation.csv``).

    Args:
        settings: the run's ``participation`` section (``name`` and the model's parameters).
        num_clients, per_round, seed: the run's ``clients``, ``clients_per_round`` and ``seed``.
    """

    def __init__(self, settings, num_clients: int, per_round: int, seed: int):
        self.settings = settings
        self.num_clients = num_clients
        self.seed = seed
        self.uniform = Uniform(num_clients, min(per_round, num_clients), seed)
        self.model: ParticipationModel | None = None  # None: uniform in every round
        self.setup_model: ParticipationModel | None = None  # Poisson sampling of round 0 too
        self.participants: list[list[int]] = []

    def use_rate(self, rate: float, secret: bool = False) -> None:
        """Poisson sampling: every client takes part in each round, the set-up round 0
        included, with probability ``rate``, independently (client-level DP's accounting
        assumes it); ``secret``: drawn from a key the OS gives this process
        (``SecretBernoulli``), else from the run's seed (reproducible)."""
        if secret:
            self.model = SecretBernoulli([rate] * self.num_clients)
            self.setup_model = SecretBernoulli([rate] * self.num_clients)
            return
        self.model = Bernoulli([rate] * self.num_clients, self.seed + 2)
        self.setup_model = Bernoulli([rate] * self.num_clients, self.seed + 3)

    def use_label_histograms(self, label_histograms: dict[int, list[int]] | None) -> None:
        """Build the participation model from each partition's label histogram (FedAU's
        probabilities correlate with the label mix); nothing to do under uniform sampling."""
        settings = self.settings
        if settings.name == "uniform":
            return
        if label_histograms is None or set(label_histograms) != set(range(self.num_clients)):
            raise ValueError(f"participation={settings.name} needs the label histogram of each of "
                             f"the {self.num_clients} partitions")
        probabilities = participation_probabilities(
            [label_histograms[p] for p in range(self.num_clients)], self.seed,
            alpha_part=settings.alpha_part, mean_p=settings.mean_p, p_min=settings.p_min)
        seed = self.seed + 1  # not the probabilities' seed: an independent stream
        self.model = {
            "bernoulli": lambda: Bernoulli(probabilities, seed),
            "markov": lambda: Markov(probabilities, seed, a=settings.a),
            "cyclic": lambda: Cyclic(probabilities, seed, cycle_length=settings.length),
        }[settings.name]()

    def sample(self, server_round: int, eligible: list[int]) -> list[int]:
        """The sorted partitions of round ``server_round`` among ``eligible`` (sorted partition
        ids: those with a node, less the clients out of privacy budget)."""
        if server_round == 0 and self.setup_model is not None:
            active = set(self.setup_model.active(0))
            chosen = [p for p in eligible if p in active]
        elif self.model is None or server_round == 0:
            chosen = self.uniform.draw(eligible)
        else:
            active = set(self.model.active(server_round - 1))
            chosen = [p for p in eligible if p in active]
        chosen = sorted(chosen)
        if server_round > 0:
            self.participants.append(chosen)
        return chosen

    def participation_matrix(self) -> np.ndarray:
        """Boolean [rounds, clients]: which partitions were sampled in rounds 1, 2, ..."""
        matrix = np.zeros((len(self.participants), self.num_clients), dtype=bool)
        for row, partitions in enumerate(self.participants):
            matrix[row, partitions] = True
        return matrix

    def state_dict(self) -> dict:
        state = {"uniform": self.uniform.state_dict(),
                 "participants": [list(p) for p in self.participants]}
        if self.model is not None:
            state["model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.uniform.load_state_dict(state["uniform"])
        self.participants = [list(p) for p in state["participants"]]
        if self.model is not None:
            self.model.load_state_dict(state["model"])


WEIGHTINGS = ("samples", "uniform", "fedau")


class ClientWeighting:
    """The coefficients ``c_k`` of a round's valid replies (ALGORITHMS.md, "Weighting"):
    ``n_k / sum n`` (samples), ``1/K`` (uniform) or ``omega_k / N`` (FedAU: never
    renormalised, and its estimator steps every round, also one without replies)."""

    def __init__(self, rule: str, num_clients: int, fedau_cutoff: int | None = None):
        if rule not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {rule!r}")
        self.rule = rule
        self.num_clients = num_clients
        self.fedau = FedAUWeights(num_clients, fedau_cutoff) if rule == "fedau" else None

    @property
    def normalised(self) -> bool:
        """The coefficients sum to 1 by construction (samples, uniform; not FedAU)."""
        return self.fedau is None

    def coefficients(self, partition_ids: list[int], num_examples: list[int]) -> list[float]:
        """``c_k`` per reply, in the order given (FedAU: advances the estimator one round)."""
        if self.fedau is not None:
            omega = self.fedau.step(partition_ids)
            return [omega[p] / self.num_clients for p in partition_ids]
        if not partition_ids:
            return []
        if self.rule == "uniform":
            return [1.0 / len(partition_ids)] * len(partition_ids)
        return sample_weights(num_examples)

    def state_dict(self) -> dict:
        return {"fedau": self.fedau.state_dict()} if self.fedau is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.fedau is not None:
            self.fedau.load_state_dict(state["fedau"])

