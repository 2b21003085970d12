"""The run configuration: one validated dataclass built from Hydra's config (or a plain dict).

Validation happens here, in the launching process, before Ray or any Flower node starts. Every
problem is a ``ConfigError`` whose one-line message names the key, the bad value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from fedlora.data import DataSpec
from fedlora.errors import ConfigError
from fedlora.models import EMBEDDED_MODEL, ModelSpec

PARTITIONS = ("iid", "dirichlet", "pathological")
PARTICIPATIONS = ("uniform", "bernoulli", "markov", "cyclic")
WEIGHTINGS = ("samples", "uniform", "fedau")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class FedSBConfig:
    """Fed-SB (arXiv 2502.15436) with LoRA-SB's initialisation (arXiv 2411.19557).

    The first gradient is estimated federatedly: clients sampled in a round 0 upload their
    summed base-weight gradients (m x n per adapted matrix, once, counted in the bytes).

    init_samples: examples whose summed gradient is used (the official code's ``num_samples``),
        split evenly over the round-0 clients.
    init_lr: the step size eta of the first-step surrogate ``-eta * sign(G)``.
    """

    init_samples: int = 256
    init_lr: float = 1e-3


@dataclass(frozen=True)
class FedSVDConfig:
    """FedSVD (arXiv 2505.12805): B trained with A frozen, then ``B A`` re-factorised by SVD.

    period: re-factorise every this many rounds (the paper's scripts: 1); 0 never does, which
        is FFA-LoRA exactly.
    """

    period: int = 1


@dataclass(frozen=True)
class LoRAFAIRConfig:
    """LoRA-FAIR (arXiv 2411.14961): the server corrects FedIT's B so that ``(B + dB) A``
    approaches the clients' mean product.

    objective: ``cos`` minimises ``1 - cos + lam ||dB||_F`` by Adam on the server (the paper's);
        ``ls`` the closed-form ridge ``||.||_F^2 + lam ||dB||_F^2``.
    lam: the regularisation weight lambda (paper: 0.01).
    steps: Adam steps of the ``cos`` objective (not given by the paper).
    """

    objective: str = "cos"
    lam: float = 0.01
    steps: int = 200


@dataclass(frozen=True)
class FedExConfig:
    """FedEx-LoRA (arXiv 2410.09432): FedIT plus the residual ``E_w[B_k A_k] - B A`` folded
    into every client's base weight.

    residual: ``dense`` ships the m x n residual (the official code), ``factored`` the stacked
        factors, (K + 1) r (m + n) elements per matrix and missed round.
    """

    residual: str = "dense"


@dataclass(frozen=True)
class FedAUConfig:
    """FedAU (arXiv 2306.03401), used with ``weighting=fedau``.

    cutoff: an absence of this many rounds is recorded as one interval K; None: no cutoff.
    """

    cutoff: int | None = None


@dataclass(frozen=True)
class DPConfig:
    """Record-level DP-SGD on each client with Opacus (ALGORITHMS.md, "Differential privacy").

    epsilon: the target each client's epsilon never exceeds over the whole run; None (or inf):
        no DP. Each client's noise multiplier is planned from it (``fedlora.privacy``).
    delta: the target delta; client k uses ``min(delta, 1 / n_k)``.
    clip: the per-example gradient clipping norm C.
    accountant: ``rdp`` or ``prv`` (Opacus' accountants).
    mode: ``record`` (example-level DP-SGD on each client); client-level DP-FedAvg is not
        implemented.
    """

    epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    accountant: str = "rdp"
    mode: str = "record"

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


@dataclass(frozen=True)
class ParticipationConfig:
    """Who takes part in each round (FedAU's participation models, arXiv 2306.03401, sec. 5;
    ``fedlora.participation``).

    name: ``uniform`` samples exactly ``clients_per_round`` clients; ``bernoulli``, ``markov``
        and ``cyclic`` draw each client's presence from its probability
        ``p_k = max(p_min, C mean_p <pi_k, v>)`` with ``v ~ Dirichlet(alpha_part)`` over the C
        labels and ``pi_k`` the client's label mix.
    mean_p, p_min, alpha_part: the probabilities' mean, floor and Dirichlet concentration.
    a: the Markov chain's activation probability.
    length: the cyclic model's cycle length L.
    """

    name: str = "uniform"
    mean_p: float = 0.1
    p_min: float = 0.02
    alpha_part: float = 0.1
    a: float = 0.05
    length: int = 100


@dataclass(frozen=True)
class FaultsConfig:
    """Simulated client failures, to study a federation that loses clients (``fedlora.clients``).

    crash_prob: the probability that a sampled client fails a training round (it replies with
        an error instead of an update), drawn from a generator seeded by (seed, round,
        partition), so the same clients fail in every run with the same seed.
    """

    crash_prob: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    strategy: str = "fedsb"
    model: str = EMBEDDED_MODEL
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    clients: int = 100
    clients_per_round: int = 10
    rounds: int = 25
    local_steps: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    max_length: int = 32
    seed: int = 0
    eval_every: int = 1
    device: str = "cpu"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    partition: str = "iid"
    partition_alpha: float = 0.5
    partition_labels_per_client: int = 2
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    weighting: str = "samples"
    server_lr: float = 1.0
    fedau: FedAUConfig = field(default_factory=FedAUConfig)
    data: DataSpec = field(default_factory=DataSpec)
    fedsb: FedSBConfig = field(default_factory=FedSBConfig)
    fedsvd: FedSVDConfig = field(default_factory=FedSVDConfig)
    lorafair: LoRAFAIRConfig = field(default_factory=LoRAFAIRConfig)
    fedex: FedExConfig = field(default_factory=FedExConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    min_clients: int = 1
    round_timeout: float = 3600.0
    checkpoint_every: int = 1
    dp: DPConfig = field(default_factory=DPConfig)
    verbose: bool = False

    def model_spec(self, num_labels: int) -> ModelSpec:
        from fedlora.strategies import get_strategy

        return ModelSpec(name=self.model, num_labels=num_labels, rank=self.rank, alpha=self.alpha,
                         targets=self.targets, latent=get_strategy(self.strategy).latent,
                         init_seed=self.seed)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """Validate a nested config dict (Hydra's, resolved) and fill strategy defaults."""
        from fedlora.strategies import STRATEGIES, get_strategy

        raw = dict(raw)
        # partition_* fields are set from the partition section only; out and resume are
        # where the run writes, not what it computes (``fedlora.simulate``).
        known = ({f.name for f in fields(cls)} - {"partition_alpha", "partition_labels_per_client"}
                 | {"out", "resume"})
        for key in raw:
            if key not in known:
                raise ConfigError(f"'{key}' is not a fedlora setting; see fedlora/conf/config.yaml "
                                  "for the valid keys")
        strategy = raw.get("strategy", cls.strategy)
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy '{strategy}' is unknown; choose one of: "
                              f"{', '.join(STRATEGIES)}")
        defaults = get_strategy(strategy).defaults
        clients = _positive_int(raw, "clients", cls.clients)
        rank = _positive_int(raw, "rank", defaults["rank"])
        per_round = raw.get("clients_per_round")
        per_round = min(10, clients) if per_round is None else _positive_int(raw, "clients_per_round", 0)
        if per_round > clients:
            raise ConfigError(f"clients_per_round={per_round} exceeds clients={clients}; set "
                              f"clients_per_round <= {clients} or raise clients")
        partition = raw.get("partition") or {}
        if isinstance(partition, str):
            partition = {"name": partition}
        _known_keys(partition, ("name", "alpha", "labels_per_client"), "partition")
        partition_name = _choice(partition, "name", "iid", PARTITIONS, "partition")
        partition_alpha = _positive_float(partition, "alpha", 0.5, key_name="partition.alpha")
        labels_per_client = _positive_int(partition, "labels_per_client", 2,
                                          key_name="partition.labels_per_client")
        participation = _participation(raw.get("participation"))
        weighting = _choice(raw, "weighting", "samples", WEIGHTINGS, "weighting")
        fedau_raw = _section(raw, "fedau", FedAUConfig)
        cutoff = fedau_raw.get("cutoff")
        fedau = FedAUConfig(cutoff=None if cutoff is None else
                            _positive_int(fedau_raw, "cutoff", 0, key_name="fedau.cutoff"))
        fedsvd_raw = _section(raw, "fedsvd", FedSVDConfig)
        fedsvd = FedSVDConfig(period=_nonneg_int(fedsvd_raw, "period", 1, key_name="fedsvd.period"))
        lorafair_raw = _section(raw, "lorafair", LoRAFAIRConfig)
        lorafair = LoRAFAIRConfig(
            objective=_choice(lorafair_raw, "objective", "cos", ("cos", "ls"), "lorafair.objective"),
            lam=_nonneg_float(lorafair_raw, "lam", 0.01, key_name="lorafair.lam"),
            steps=_nonneg_int(lorafair_raw, "steps", 200, key_name="lorafair.steps"))
        fedex_raw = _section(raw, "fedex", FedExConfig)
        fedex = FedExConfig(residual=_choice(fedex_raw, "residual", "dense", ("dense", "factored"),
                                             "fedex.residual"))
        device = raw.get("device", "cpu")
        if device not in DEVICES:
            raise ConfigError(f"device '{device}' is unknown; choose one of: {', '.join(DEVICES)}")
        client_gpus = _nonneg_float(raw, "client_gpus", 0.0)
        if device == "cuda" and client_gpus == 0:
            raise ConfigError("device=cuda needs client_gpus > 0 (e.g. client_gpus=0.25: four "
                              "clients share one GPU)")
        if client_gpus > 0 and device != "cuda":
            raise ConfigError(f"client_gpus={client_gpus} needs device=cuda; set device=cuda or "
                              "client_gpus=0")
        targets = raw.get("targets") or ()
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        data = raw.get("data") or {}
        _known_keys(data, tuple(f.name for f in fields(DataSpec)), "data")
        if data.get("path") and data.get("name"):
            raise ConfigError("data.path and data.name are both set; give one of them")
        test_fraction = float(data.get("test_fraction", 0.2))
        if not 0 < test_fraction < 1:
            raise ConfigError(f"data.test_fraction={test_fraction} must be in (0, 1)")
        fedsb_raw = _section(raw, "fedsb", FedSBConfig)
        fedsb = FedSBConfig(init_samples=_positive_int(fedsb_raw, "init_samples", 256,
                                                       key_name="fedsb.init_samples"),
                            init_lr=_positive_float(fedsb_raw, "init_lr", 1e-3,
                                                    key_name="fedsb.init_lr"))
        lr_schedule = raw.get("lr_schedule", "cosine")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule '{lr_schedule}' is unknown; choose one of: "
                              f"{', '.join(LR_SCHEDULES)}")
        alpha = raw.get("alpha")
        faults_raw = _section(raw, "faults", FaultsConfig)
        crash_prob = _nonneg_float(faults_raw, "crash_prob", 0.0, key_name="faults.crash_prob")
        if crash_prob >= 1:
            raise ConfigError(f"faults.crash_prob={crash_prob} is a probability; set it < 1")
        min_clients = _positive_int(raw, "min_clients", 1)
        if min_clients > per_round and participation.name == "uniform":
            raise ConfigError(f"min_clients={min_clients} exceeds clients_per_round={per_round}; "
                              f"set min_clients <= {per_round}")
        return cls(
            strategy=strategy, model=str(raw.get("model") or EMBEDDED_MODEL), rank=rank,
            alpha=float(defaults["alpha_per_rank"] * rank) if alpha is None
            else _positive_float(raw, "alpha", 0.0),
            targets=tuple(targets), clients=clients, clients_per_round=per_round,
            rounds=_positive_int(raw, "rounds", cls.rounds),
            local_steps=_positive_int(raw, "local_steps", cls.local_steps),
            batch_size=_positive_int(raw, "batch_size", cls.batch_size),
            lr=defaults["lr"] if raw.get("lr") is None else _positive_float(raw, "lr", 0.0),
            lr_schedule=lr_schedule,
            max_length=_positive_int(raw, "max_length", cls.max_length),
            seed=_int(raw, "seed", 0),
            eval_every=_positive_int(raw, "eval_every", 1),
            device=device, client_cpus=_positive_float(raw, "client_cpus", 1.0),
            client_gpus=client_gpus, partition=partition_name, partition_alpha=partition_alpha,
            partition_labels_per_client=labels_per_client, participation=participation,
            weighting=weighting, server_lr=_positive_float(raw, "server_lr", 1.0), fedau=fedau,
            data=DataSpec(path=data.get("path"), name=data.get("name"),
                          text_field=data.get("text_field", "text"),
                          label_field=data.get("label_field", "label"), test_fraction=test_fraction),
            fedsb=fedsb, fedsvd=fedsvd, lorafair=lorafair, fedex=fedex,
            faults=FaultsConfig(crash_prob=crash_prob), min_clients=min_clients,
            round_timeout=_positive_float(raw, "round_timeout", 3600.0),
            checkpoint_every=_nonneg_int(raw, "checkpoint_every", 1),
            dp=_dp(_section(raw, "dp", DPConfig)),
            verbose=bool(raw.get("verbose", False)))

    @classmethod
    def from_saved(cls, saved: dict) -> "RunConfig":
        """The config a run saved in its ``config.yaml`` (``to_dict``'s layout, plus ``out``)."""
        raw = {k: v for k, v in saved.items()
               if k not in ("out", "resume", "partition_alpha", "partition_labels_per_client")}
        raw["partition"] = {"name": saved["partition"], "alpha": saved["partition_alpha"],
                            "labels_per_client": saved["partition_labels_per_client"]}
        return cls.from_dict(raw)


def _participation(raw) -> ParticipationConfig:
    section = {"name": raw} if isinstance(raw, str) else dict(raw or {})
    _known_keys(section, tuple(f.name for f in fields(ParticipationConfig)), "participation")
    a = _positive_float(section, "a", 0.05, key_name="participation.a")
    mean_p = _positive_float(section, "mean_p", 0.1, key_name="participation.mean_p")
    p_min = _nonneg_float(section, "p_min", 0.02, key_name="participation.p_min")
    for key, value in (("a", a), ("mean_p", mean_p), ("p_min", p_min)):
        if value > 1:
            raise ConfigError(f"participation.{key}={value} is a probability; set it <= 1")
    return ParticipationConfig(
        name=_choice(section, "name", "uniform", PARTICIPATIONS, "participation"),
        mean_p=mean_p, p_min=p_min, a=a,
        alpha_part=_positive_float(section, "alpha_part", 0.1, key_name="participation.alpha_part"),
        length=_positive_int(section, "length", 100, key_name="participation.length"))


def _dp(section: dict) -> DPConfig:
    epsilon = section.get("epsilon")
    try:
        if float(epsilon) == math.inf:
            epsilon = None  # inf: no DP (so a sweep can include the non-private run)
    except (TypeError, ValueError):
        pass  # None, or not a number (reported below)
    if epsilon is not None:
        epsilon = _positive_float(section, "epsilon", None, key_name="dp.epsilon")
    delta = _positive_float(section, "delta", 1e-5, key_name="dp.delta")
    if delta >= 1:
        raise ConfigError(f"dp.delta={delta} must be < 1 (usually well below 1/n: 1e-5)")
    mode = _choice(section, "mode", "record", ("record", "client"), "dp.mode")
    if mode == "client" and epsilon is not None:
        raise ConfigError("dp.mode=client (client-level DP-FedAvg) is not implemented; use "
                          "dp.mode=record")
    return DPConfig(epsilon=epsilon, delta=delta,
                    clip=_positive_float(section, "clip", 1.0, key_name="dp.clip"),
                    accountant=_choice(section, "accountant", "rdp", ("rdp", "prv"),
                                       "dp.accountant"),
                    mode=mode)


def _section(raw: dict, name: str, config_class) -> dict:
    """The nested section ``name`` of the raw config, its keys checked against the dataclass."""
    section = raw.get(name) or {}
    _known_keys(section, tuple(f.name for f in fields(config_class)), name)
    return section


def _choice(raw: dict, key: str, default: str, choices: tuple[str, ...], key_name: str) -> str:
    value = raw.get(key)
    value = default if value is None else value
    if value not in choices:
        raise ConfigError(f"{key_name} '{value}' is unknown; choose one of: {', '.join(choices)}")
    return value


def _known_keys(section: dict, valid: tuple[str, ...], name: str) -> None:
    for key in section:
        if key not in valid:
            raise ConfigError(f"'{name}.{key}' is not a fedlora setting; valid keys under {name}: "
                              f"{', '.join(valid)}")


def _number(raw: dict, key: str, default, kind, key_name: str | None):
    value = raw.get(key, default)
    if value is None:
        value = default
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key_name or key}={value!r} is not a number of type {kind.__name__}; "
                          f"set {key_name or key} to one") from None
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{key_name or key}={value!r} must be finite")
    return number


def _int(raw, key, default, key_name=None) -> int:
    return _number(raw, key, default, int, key_name)


def _checked(raw, key, default, kind, key_name, valid, requirement: str):
    """A number of ``kind`` that must satisfy ``valid``; ``requirement`` ends the error line
    (``{name}`` stands for the key)."""
    value = _number(raw, key, default, kind, key_name)
    if not valid(value):
        raise ConfigError(f"{key_name or key}={value} " + requirement.format(name=key_name or key))
    return value


def _positive_int(raw, key, default, key_name=None) -> int:
    return _checked(raw, key, default, int, key_name, lambda v: v > 0,
                    "must be a positive integer; set {name} >= 1")


def _nonneg_int(raw, key, default, key_name=None) -> int:
    return _checked(raw, key, default, int, key_name, lambda v: v >= 0, "must be an integer >= 0")


def _positive_float(raw, key, default, key_name=None) -> float:
    return _checked(raw, key, default, float, key_name, lambda v: v > 0, "must be > 0")


def _nonneg_float(raw, key, default, key_name=None) -> float:
    return _checked(raw, key, default, float, key_name, lambda v: v >= 0, "must be >= 0")


# --------------------------------------------------------------------------------------------
# What a client needs to know travels in every message's ConfigRecord, so the same ClientApp
# serves simulation and deployment without a config of its own.


def client_config(cfg: RunConfig, num_labels: int) -> dict:
    """The flat ConfigRecord values the server sends with every message."""
    return {"model": cfg.model, "num-labels": num_labels, "rank": cfg.rank, "alpha": cfg.alpha,
            "targets": ",".join(cfg.targets), "latent": cfg.model_spec(num_labels).latent,
            "init-seed": cfg.seed, "data-path": cfg.data.path or "", "data-name": cfg.data.name or "",
            "text-field": cfg.data.text_field, "label-field": cfg.data.label_field,
            "test-fraction": cfg.data.test_fraction, "partition": cfg.partition,
            "partition-alpha": cfg.partition_alpha,
            "partition-labels-per-client": cfg.partition_labels_per_client, "seed": cfg.seed,
            "max-length": cfg.max_length, "device": cfg.device, "client-cpus": cfg.client_cpus,
            "local-steps": cfg.local_steps, "batch-size": cfg.batch_size, "lr": cfg.lr,
            "crash-prob": cfg.faults.crash_prob, **dp_client_config(cfg)}


def dp_client_config(cfg: RunConfig) -> dict:
    """The DP settings a client needs to plan its noise multiplier on its own (0: no DP):
    the most training steps it can take in the run (local steps x rounds: participation is
    not credited) and Fed-SB's init examples per init client (one more release to charge)."""
    if not cfg.dp.enabled:
        return {"dp-epsilon": 0.0}
    init_share = -(-cfg.fedsb.init_samples // cfg.clients_per_round) if cfg.strategy == "fedsb" else 0
    return {"dp-epsilon": cfg.dp.epsilon, "dp-delta": cfg.dp.delta, "dp-clip": cfg.dp.clip,
            "dp-accountant": cfg.dp.accountant, "dp-max-steps": cfg.local_steps * cfg.rounds,
            "dp-init-samples": init_share}


def round_lr(cfg: RunConfig, server_round: int) -> float:
    """The clients' learning rate in a round: constant, or cosine-decayed from ``lr`` in round 1
    to ``0.1 * lr`` in the last round (a stable final model despite client drift)."""
    if cfg.lr_schedule == "constant" or cfg.rounds == 1:
        return cfg.lr
    progress = (server_round - 1) / (cfg.rounds - 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def specs_from_client_config(record) -> tuple[ModelSpec, DataSpec]:
    """The model and data a client must build, from the server's ConfigRecord."""
    targets = tuple(t for t in str(record["targets"]).split(",") if t)
    model = ModelSpec(name=record["model"], num_labels=int(record["num-labels"]),
                      rank=int(record["rank"]), alpha=float(record["alpha"]), targets=targets,
                      latent=bool(record["latent"]), init_seed=int(record["init-seed"]))
    data = DataSpec(path=record["data-path"] or None, name=record["data-name"] or None,
                    text_field=record["text-field"], label_field=record["label-field"],
                    test_fraction=float(record["test-fraction"]))
    return model, data
