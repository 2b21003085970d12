"""Privacy accounting for record-level DP-SGD on each client (ALGORITHMS.md, "Differential
privacy"; methods-b note, section 4.2): pure helpers, no models.

A client's accountant *is* its history: a list of ``(noise_multiplier, sample_rate, steps)``
entries, Opacus' own accountant history format, so any Opacus accountant (``rdp``, ``prv``)
rebuilt from it gives the same epsilon. The history is small, plain data: it lives in the
node's ``Context.state``, travels in reply metrics, and the server keeps a copy per client
(``PrivacyLedger``, part of the strategy's ``state_dict``). Epsilon is never reset per round.

Planning (``plan_noise_multiplier``): sigma_k is the smallest noise multiplier (to 0.01) such
that the client's epsilon after the *most* steps it can take in the run stays within the target
at ``delta_k = min(delta, 1/n_k)``. Client sampling is not credited as amplification.

Release log. The history alone merges mechanisms and cannot say which entry is Fed-SB's init
release; a client's *release log* keeps one entry per release, ``{"kind": "init"|"train",
"round", "noise_multiplier", "sample_rate", "steps"}``, from which the history (and so epsilon)
is recomputed (``history_from_releases``), and which ``privacy.json`` publishes per client so an
independent accountant can recompute every epsilon from the file alone.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE_MULTIPLIER = 1e4
SIGMA_PRECISION = 0.005  # the bisection's final bracket: eps(sigma - 0.01) > target is kept
# RDP orders: Opacus' defaults stop at 63, too low for the large noise multipliers of small
# clients (q = 1), which overstates their epsilon; these are dp-accounting's defaults.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]

History = list[tuple[float, float, int]]


def client_delta(delta: float, num_examples: int) -> float:
    """``delta_k = min(delta, 1/n_k)``: a delta at or above 1/n_k allows leaking one record."""
    return min(delta, 1.0 / num_examples)


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate ``q_k = b / n_k`` (at most 1: every example in every step)."""
    return min(1.0, batch_size / num_examples)


def add_steps(history: History, noise_multiplier: float, rate: float, steps: int) -> History:
    """The history after ``steps`` more steps at ``(noise_multiplier, rate)`` (merged into the
    last entry when it has the same mechanism, so a long run keeps a short history)."""
    history = [tuple(entry) for entry in history]
    if steps <= 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == rate:
        sigma, q, count = history[-1]
        return history[:-1] + [(sigma, q, count + steps)]
    return history + [(noise_multiplier, rate, steps)]


def total_steps(history: History) -> int:
    return sum(int(steps) for _, _, steps in history)


def epsilon_spent(history: History, delta: float, accountant: str) -> float:
    """Epsilon of the composed Poisson-subsampled Gaussian mechanisms in ``history``."""
    from opacus.accountants import create_accountant

    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    engine = create_accountant(mechanism=accountant)
    engine.history = history
    with warnings.catch_warnings():
        # PRV's log(0) at q = 1 is masked inside; RDP's "optimal order is the largest alpha"
        # only says the bound could be tighter (it is still an upper bound).
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "rdp":
            return float(engine.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        return float(engine.get_epsilon(delta=delta))


def planned_history(noise_multiplier: float, rate: float, steps: int,
                    init_rate: float = 0.0) -> History:
    """The longest history a client can have: Fed-SB's privatised init release (one step at
    ``init_rate``; 0 for the other methods), then ``steps`` training steps at ``rate``."""
    history = [(noise_multiplier, init_rate, 1)] if init_rate > 0 else []
    return add_steps(history, noise_multiplier, rate, steps)


@lru_cache(maxsize=64)  # clients of equal size share a plan; PRV takes seconds per plan
def plan_noise_multiplier(target_epsilon: float, delta: float, rate: float, steps: int,
                          accountant: str, init_rate: float = 0.0) -> float:
    """The smallest noise multiplier sigma (to 0.01) whose ``planned_history`` spends at most
    ``target_epsilon``: ``eps(sigma) <= target < eps(sigma - 0.01)``.

    Raises ``ValueError`` if even sigma = 1e4 does not reach the target."""

    def spends(sigma: float) -> float:
        return epsilon_spent(planned_history(sigma, rate, steps, init_rate), delta, accountant)

    low, high = 0.0, 1.0
    while spends(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {target_epsilon} is out of reach even with noise "
                             f"multiplier {MAX_NOISE_MULTIPLIER:g}")
    while high - low > SIGMA_PRECISION:
        middle = (low + high) / 2
        if spends(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


# --------------------------------------------------------------------------------------------
# What travels: a history as three lists (Flower records hold lists of numbers, not tuples).


def history_to_record(history: History, prefix: str = "dp-") -> dict:
    return {f"{prefix}sigmas": [float(s) for s, _, _ in history],
            f"{prefix}rates": [float(q) for _, q, _ in history],
            f"{prefix}steps": [int(t) for _, _, t in history]}


def history_from_record(record, prefix: str = "dp-") -> History:
    if f"{prefix}steps" not in record:
        return []
    return [(float(s), float(q), int(t)) for s, q, t in
            zip(record[f"{prefix}sigmas"], record[f"{prefix}rates"], record[f"{prefix}steps"])]


def longer_history(*histories: History) -> History:
    """The history with the most steps: a copy that missed a round never undercounts."""
    return max(histories, key=total_steps)


# --------------------------------------------------------------------------------------------
# The release log: every Gaussian release a client made, in order, and what travels of it.

RELEASE_KINDS = ("train", "init")  # a MetricRecord holds no strings: a kind travels as its index
Release = dict  # {"kind", "round", "noise_multiplier", "sample_rate", "steps"}


def add_release(releases: list[Release], kind: str, server_round: int, noise_multiplier: float,
                rate: float, steps: int) -> list[Release]:
    """The log after one more release: ``steps`` Poisson-sampled Gaussian steps at
    ``(noise_multiplier, rate)`` in ``server_round``. ``kind`` is ``"init"`` (Fed-SB's
    privatised init gradient) or ``"train"`` (a round of local DP-SGD steps)."""
    if kind not in RELEASE_KINDS:
        raise ValueError(f"release kind must be one of {RELEASE_KINDS}, got {kind!r}")
    releases = [dict(release) for release in releases]
    if steps <= 0:
        return releases
    return releases + [{"kind": kind, "round": int(server_round),
                        "noise_multiplier": float(noise_multiplier), "sample_rate": float(rate),
                        "steps": int(steps)}]


def history_from_releases(releases: list[Release]) -> History:
    """The accountant history of a release log (consecutive equal mechanisms merged, as
    ``add_steps`` does, so the epsilon equals the one the client computed step by step)."""
    history: History = []
    for release in releases:
        history = add_steps(history, float(release["noise_multiplier"]),
                            float(release["sample_rate"]), int(release["steps"]))
    return history


def release_steps(releases: list[Release]) -> int:
    return sum(int(release["steps"]) for release in releases)


def releases_to_record(releases: list[Release], prefix: str = "dp-release-") -> dict:
    """A release log as five parallel lists of numbers (what a ``MetricRecord`` and a
    ``ConfigRecord`` both hold; kinds as indices into ``RELEASE_KINDS``)."""
    return {f"{prefix}kinds": [RELEASE_KINDS.index(r["kind"]) for r in releases],
            f"{prefix}rounds": [int(r["round"]) for r in releases],
            f"{prefix}sigmas": [float(r["noise_multiplier"]) for r in releases],
            f"{prefix}rates": [float(r["sample_rate"]) for r in releases],
            f"{prefix}steps": [int(r["steps"]) for r in releases]}


def releases_from_record(record, prefix: str = "dp-release-") -> list[Release] | None:
    """The release log in ``record``; None if it carries none (a client that reports only its
    history)."""
    if f"{prefix}steps" not in record:
        return None
    columns = zip(record[f"{prefix}kinds"], record[f"{prefix}rounds"], record[f"{prefix}sigmas"],
                  record[f"{prefix}rates"], record[f"{prefix}steps"])
    return [{"kind": RELEASE_KINDS[int(k)], "round": int(r), "noise_multiplier": float(s),
             "sample_rate": float(q), "steps": int(t)} for k, r, s, q, t in columns]


def longer_releases(*logs: list[Release]) -> list[Release]:
    """The log with the most steps: a copy that missed a round never undercounts."""
    return max(logs, key=release_steps)


# --------------------------------------------------------------------------------------------
# What a reply's accountant must be before the ledger keeps it (and before the server takes the
# reply): the fields ``PrivacyLedger.record`` reads, each a finite number in its range, and the
# history and release log as equal-length lists the readers above can turn into entries.

ACCOUNTANT_FIELDS = {  # metric -> (lowest, highest) allowed value
    "dp-noise-multiplier": (0.0, math.inf), "dp-sample-rate": (0.0, 1.0),
    "dp-delta": (0.0, 1.0), "dp-epsilon": (0.0, math.inf)}
HISTORY_COLUMNS = {"sigmas": (0.0, math.inf), "rates": (0.0, 1.0), "steps": (0, math.inf)}
RELEASE_COLUMNS = {"kinds": (0, len(RELEASE_KINDS) - 1), "rounds": (0, math.inf),
                   "sigmas": (0.0, math.inf), "rates": (0.0, 1.0), "steps": (0, math.inf)}
INTEGER_COLUMNS = frozenset({"steps", "kinds", "rounds"})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_problem(key: str, value, low: float, high: float, integer: bool) -> str | None:
    if not _is_number(value) or not low <= value <= high or (integer and value != int(value)):
        kind = "an integer" if integer else "a finite number"
        return f"'{key}' is {value!r}, not {kind} in [{low:g}, {high:g}]"
    return None


def _columns_problem(metrics, prefix: str, columns: dict) -> str | None:
    keys = [f"{prefix}{name}" for name in columns]
    present = [key for key in keys if key in metrics]
    if not present:
        return None
    if len(present) < len(keys):
        return f"the accountant has {present} but lacks {sorted(set(keys) - set(present))}"
    lengths = set()
    for key, (name, (low, high)) in zip(keys, columns.items()):
        values = metrics[key]
        if not isinstance(values, list):
            return f"'{key}' is {values!r}, not a list"
        lengths.add(len(values))
        for value in values:
            problem = _value_problem(key, value, low, high, name in INTEGER_COLUMNS)
            if problem:
                return problem
    if len(lengths) > 1:
        return f"the lists {keys} differ in length"
    return None


def accountant_problem(metrics) -> str | None:
    """Why a reply's accountant (``ClientPrivacy.metrics`` in the client) cannot be taken into
    the ledger, or None: a field ``PrivacyLedger.record`` reads is missing or out of its range
    (epsilon and the noise multiplier finite and >= 0, the sample rate in [0, 1], delta in
    (0, 1]),
    the history or the release log is partial, of unequal lengths, or holds a value that is
    not a finite number in range (steps and rounds integers >= 0, kinds indices of
    ``RELEASE_KINDS``), or ``dp-declined`` is not 0 or 1."""
    for key, (low, high) in ACCOUNTANT_FIELDS.items():
        if key not in metrics:
            return f"the accountant lacks '{key}'"
        problem = _value_problem(key, metrics[key], low, high, integer=False)
        if problem:
            return problem
    if metrics["dp-delta"] <= 0:  # delta_k = min(delta, 1/n_k) > 0
        return f"'dp-delta' is {metrics['dp-delta']!r}, not in (0, 1]"
    problem = (_columns_problem(metrics, "dp-", HISTORY_COLUMNS)
               or _columns_problem(metrics, "dp-release-", RELEASE_COLUMNS))
    if problem:
        return problem
    if "dp-declined" in metrics and metrics["dp-declined"] not in (0, 1):
        return f"'dp-declined' is {metrics['dp-declined']!r}, not 0 or 1"
    return None


NOISE_SOURCES = ("secret", "reproducible")  # fedlora.privacy.randomness's modes
DP_MODES = ("record", "client")


class PrivacyLedger:
    """The server's copy of every client's accountant (by partition id), and who has declined.

    Clients report their release log (or, older clients, only their history), noise
    multiplier, delta and epsilon in every reply; the server sends its copy back with each
    train message, so a client whose process (and node state) was recreated resumes from it.
    Part of the strategy's ``state_dict``. ``noise`` says where the clients' DP randomness came
    from (``"secret"``: node secrets, ``"reproducible"``: seeds the server knows) and ``mode``
    the unit of privacy (``"record"``: DP-SGD on each client, ``"client"``: DP-FedAvg); both
    are written to ``privacy.json``.
    """

    def __init__(self, target_epsilon: float, accountant: str, noise: str = "reproducible",
                 mode: str = "record"):
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        if mode not in DP_MODES:
            raise ValueError(f"mode must be one of {DP_MODES}, got {mode!r}")
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.noise = noise
        self.mode = mode
        self.clients: dict[int, dict] = {}
        self.declined: set[int] = set()  # clients that cannot afford another round

    def record(self, partition_id: int, metrics) -> None:
        """Keep a client's reported accountant (if it has at least the steps we know of)."""
        releases = releases_from_record(metrics)
        history = history_from_releases(releases) if releases is not None else history_from_record(metrics)
        known = self.clients.get(partition_id)
        if known is not None and total_steps(history) < total_steps(known["history"]):
            return
        self.clients[partition_id] = {
            "noise_multiplier": float(metrics["dp-noise-multiplier"]),
            "sample_rate": float(metrics["dp-sample-rate"]),
            "delta": float(metrics["dp-delta"]), "epsilon": float(metrics["dp-epsilon"]),
            "history": history, "releases": releases}

    def decline(self, partition_id: int) -> None:
        self.declined.add(partition_id)

    def config_for(self, partition_id: int) -> dict:
        """What a train message carries: the server's copy of this client's accountant (its
        history and release log; not its noise multiplier, which a node plans itself)."""
        known = self.clients.get(partition_id)
        if known is None:
            return {}
        releases = known.get("releases")
        return {**history_to_record(known["history"], prefix="dp-known-"),
                **(releases_to_record(releases, prefix="dp-known-release-")
                   if releases is not None else {})}

    def max_epsilon(self) -> float:
        """The headline epsilon: the most any client has spent so far (0 before any step)."""
        return max((c["epsilon"] for c in self.clients.values()), default=0.0)

    def report(self) -> dict:
        """``privacy.json``: per client its release log (all an independent accountant needs
        to recompute epsilon: compose each release's ``steps`` Poisson-sampled Gaussian steps
        at ``(noise_multiplier, sample_rate)`` and read epsilon at the client's ``delta``),
        and the run-level summary. Also per client, both derived from the log and consistent
        with it: ``history`` (the merged accountant history) and ``steps`` (every Gaussian
        step, Fed-SB's init release included). A client that reported no release log (an
        older client) has no ``releases``; its history recomputes epsilon just as well but
        cannot say which step was which release. There is no flat ``sample_rate``: a Fed-SB
        client has two (init and training), and one number cannot recompute epsilon."""
        clients = {}
        for partition, c in sorted(self.clients.items()):
            entry = {"accountant": self.accountant, "delta": c["delta"], "epsilon": c["epsilon"],
                     "noise_multiplier": c["noise_multiplier"],
                     "history": [list(e) for e in c["history"]],
                     "steps": total_steps(c["history"])}
            if c.get("releases") is not None:
                entry["releases"] = [dict(r) for r in c["releases"]]
            clients[str(partition)] = entry
        return {"noise": self.noise, "mode": self.mode, "target_epsilon": self.target_epsilon,
                "accountant": self.accountant, "max_epsilon": self.max_epsilon(),
                "declined": sorted(self.declined), "clients": clients}

    def state_dict(self) -> dict:
        return {"clients": [[p, {**c, "history": [list(e) for e in c["history"]]}]
                            for p, c in sorted(self.clients.items())],
                "declined": sorted(self.declined)}

    def load_state_dict(self, state: dict) -> None:
        self.clients = {int(p): {"releases": None, **c,
                                 "history": [tuple(e) for e in c["history"]]}
                        for p, c in state["clients"]}
        self.declined = set(state["declined"])


def epsilon_from_report_entry(entry: dict, accountant: str | None = None) -> float:
    """Recompute a client's epsilon from its ``privacy.json`` entry (fedlora's accountant)."""
    history = (history_from_releases(entry["releases"]) if "releases" in entry
               else [tuple(e) for e in entry["history"]])
    return epsilon_spent(history, float(entry["delta"]), accountant or entry["accountant"])


# --------------------------------------------------------------------------------------------
# The strategy's privacy part, shaped like Flower's DP strategy wrappers: it touches only what
# goes out (configs) and what comes in (replies), around the strategy's own round.


class ServerPrivacy:
    """The server's side of client-level accounting for record-level DP-SGD on each client.

    Like Flower's ``DifferentialPrivacy*`` strategy wrappers it works on the messages around
    the round: ``outgoing`` adds the server's copy of each client's accountant to its train
    config (a client whose node state was lost resumes from it); ``incoming`` copies each
    reply's accountant into the ledger and takes out the clients that declined for lack of
    budget before the replies are validated and aggregated (declining is no failure). Clients
    that declined are never eligible again (``eligible``).
    """

    def __init__(self, target_epsilon: float, accountant: str, noise: str = "reproducible"):
        self.ledger = PrivacyLedger(target_epsilon, accountant, noise=noise)

    def eligible(self, partition_ids: list[int]) -> list[int]:
        """``partition_ids`` less the clients out of budget (order kept)."""
        return [p for p in partition_ids if p not in self.ledger.declined]

    def outgoing(self, partition_id: int) -> dict:
        """The config values a train message to ``partition_id`` carries."""
        return self.ledger.config_for(partition_id)

    def incoming(self, replies, partition_of: dict[int, int]) -> tuple[list, list[int]]:
        """``(replies to aggregate, partitions that declined now)``. A reply without a
        well-formed accountant (an error, a stranger, a malformed or missing one,
        ``accountant_problem``) is kept, and its accountant is not: the reply check says what
        is wrong with it."""
        kept, declined = [], []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            partition_id = partition_of.get(reply.metadata.src_node_id)
            if metrics is None or partition_id is None or accountant_problem(metrics):
                kept.append(reply)
                continue
            self.ledger.record(partition_id, metrics)
            if metrics.get("dp-declined"):
                self.ledger.decline(partition_id)
                declined.append(partition_id)
            else:
                kept.append(reply)
        return kept, declined

    def state_dict(self) -> dict:
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ledger.load_state_dict(state)
