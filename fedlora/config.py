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

PARTITIONS = ("iid", "dirichlet")
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
    data: DataSpec = field(default_factory=DataSpec)
    fedsb: FedSBConfig = field(default_factory=FedSBConfig)
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
        known = {f.name for f in fields(cls)} | {"out", "partition"}
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
        _known_keys(partition, ("name", "alpha"), "partition")
        partition_name = partition.get("name", "iid")
        if partition_name not in PARTITIONS:
            raise ConfigError(f"partition '{partition_name}' is unknown; choose one of: "
                              f"{', '.join(PARTITIONS)}")
        partition_alpha = _positive_float(partition, "alpha", 0.5, key_name="partition.alpha")
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
        fedsb_raw = raw.get("fedsb") or {}
        _known_keys(fedsb_raw, tuple(f.name for f in fields(FedSBConfig)), "fedsb")
        fedsb = FedSBConfig(init_samples=_positive_int(fedsb_raw, "init_samples", 256,
                                                       key_name="fedsb.init_samples"),
                            init_lr=_positive_float(fedsb_raw, "init_lr", 1e-3,
                                                    key_name="fedsb.init_lr"))
        lr_schedule = raw.get("lr_schedule", "cosine")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule '{lr_schedule}' is unknown; choose one of: "
                              f"{', '.join(LR_SCHEDULES)}")
        alpha = raw.get("alpha")
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
            data=DataSpec(path=data.get("path"), name=data.get("name"),
                          text_field=data.get("text_field", "text"),
                          label_field=data.get("label_field", "label"), test_fraction=test_fraction),
            fedsb=fedsb, verbose=bool(raw.get("verbose", False)))


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


def _positive_int(raw, key, default, key_name=None) -> int:
    value = _number(raw, key, default, int, key_name)
    if value <= 0:
        raise ConfigError(f"{key_name or key}={value} must be a positive integer; set "
                          f"{key_name or key} >= 1")
    return value


def _positive_float(raw, key, default, key_name=None) -> float:
    value = _number(raw, key, default, float, key_name)
    if value <= 0:
        raise ConfigError(f"{key_name or key}={value} must be > 0")
    return value


def _nonneg_float(raw, key, default, key_name=None) -> float:
    value = _number(raw, key, default, float, key_name)
    if value < 0:
        raise ConfigError(f"{key_name or key}={value} must be >= 0")
    return value


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
            "partition-alpha": cfg.partition_alpha, "seed": cfg.seed,
            "max-length": cfg.max_length, "device": cfg.device, "client-cpus": cfg.client_cpus,
            "local-steps": cfg.local_steps, "batch-size": cfg.batch_size, "lr": cfg.lr}


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
