"""The run configuration: one validated dataclass built from Hydra's config (or a plain dict).

Each section is a frozen dataclass whose fields hold the one default of their key, its help
text and its rule (``fedlora.core.settings.setting``); each method's own section comes from the
method registry (``fedlora.core.registry``: ``<name>.*`` keys). Validation happens here, in the
launching process, before Ray or any Flower node starts. Every problem is a ``ConfigError``
whose one-line message names the key, the bad value and the fix.

Layer 5: may import core, aggregation, privacy, model, tasks and report; the clients, the
strategies and the run loop import it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace

from flwr.common.config import flatten_dict, unflatten_dict

from fedlora.tasks.data import DataSpec
from fedlora.core.errors import ConfigError
from fedlora.model.pretrained import PRECISIONS, ModelSpec
from fedlora.core.registry import default_strategy, get_method, methods
from fedlora.tasks import EvalSpec, Task, default_task, get_task, make_task
from fedlora.report.tracking import TRACKERS, missing_package
from fedlora.core.settings import (AT_MOST_ONE, BELOW_ONE, NONNEGATIVE, POSITIVE, build,
                                   parse_section, run_config_values, schema, schema_fields,
                                   setting, validated)

PARTITIONS = ("iid", "dirichlet", "pathological")
PARTICIPATIONS = ("uniform", "bernoulli", "markov", "cyclic")
WEIGHTINGS = ("samples", "uniform", "fedau")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("cpu", "cuda")
QUANTIZATIONS = (4,)
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PartitionConfig:
    """How the training examples are split over clients (flwr-datasets partitioners)."""

    name: str = setting("iid", "iid | dirichlet (per-label Dirichlet) | pathological (k labels "
                        "per client)", choices=PARTITIONS, names_section=True)
    alpha: float = setting(0.5, "dirichlet: concentration (smaller: more skew)", check=POSITIVE)
    labels_per_client: int = setting(2, "pathological: labels each client holds", check=POSITIVE)


@dataclass(frozen=True)
class ParticipationConfig:
    """Who takes part in each round (FedAU's participation models, arXiv 2306.03401, sec. 5;
    ``fedlora.aggregation.participation``). ``uniform`` samples exactly ``clients_per_round`` clients;
    ``bernoulli``, ``markov`` and ``cyclic`` draw each client's presence from its probability
    ``p_k = max(p_min, C mean_p <pi_k, v>)`` with ``v ~ Dirichlet(alpha_part)`` over the C labels
    and ``pi_k`` the client's label mix."""

    name: str = setting("uniform", "uniform | bernoulli | markov | cyclic", choices=PARTICIPATIONS,
                        names_section=True)
    mean_p: float = setting(0.1, "mean of p_k over clients (FedAU paper: 0.1)",
                            check=(POSITIVE, AT_MOST_ONE))
    p_min: float = setting(0.02, "floor of p_k", check=(NONNEGATIVE, AT_MOST_ONE))
    alpha_part: float = setting(0.1, "Dirichlet concentration of the favoured-label draw (small: "
                                "strong correlation)", check=POSITIVE)
    a: float = setting(0.05, "markov: probability inactive -> active", check=(POSITIVE, AT_MOST_ONE))
    length: int = setting(100, "cyclic: cycle length L", check=POSITIVE)


@dataclass(frozen=True)
class FedAUConfig:
    """FedAU (arXiv 2306.03401), used with ``weighting=fedau``."""

    cutoff: int | None = setting(None, "an absence of this many rounds counts as one interval "
                                 "K; null: no cutoff", check=POSITIVE)


@dataclass(frozen=True)
class FaultsConfig:
    """Simulated client failures, to study a federation that loses clients."""

    crash_prob: float = setting(0.0, "simulation: probability that a sampled client fails a "
                                "round (seeded by seed, round and partition: the same clients fail "
                                "in every run with the same seed)", check=(NONNEGATIVE, BELOW_ONE))


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (docs/privacy.md): record-level DP-SGD on each client with Opacus,
    or client-level DP-FedAvg on the server (``fedlora.privacy.client_level``)."""

    epsilon: float | None = setting(None, "the target epsilon over the run (record: no client "
                                    "exceeds it; client: the run's); null or inf: no DP",
                                    check=POSITIVE)
    delta: float = setting(1e-5, "the target delta; record: client k uses min(delta, 1/n_k)",
                           check=POSITIVE)
    clip: float = setting(1.0, "record: per-example clipping norm C | client: the clipping norm "
                          "of each client's update (adaptive: its starting value)", check=POSITIVE)
    accountant: str = setting("rdp", "rdp | prv (Opacus)", choices=ACCOUNTANTS)
    mode: str = setting("record", "record: DP-SGD on each client's examples | client: each "
                        "client's whole update (McMahan et al. 2018)",
                        choices=("record", "client"))
    clipping: str = setting("fixed", "client: fixed C, or adaptive (Andrew et al. 2021: C follows "
                            "the median update norm, from noised per-client bits)",
                            choices=("fixed", "adaptive"))
    noise_multiplier: float | None = setting(None, "client: sigma itself instead of planning it "
                                             "from epsilon (then epsilon is reported, not "
                                             "targeted)", check=POSITIVE)
    secure_rng: bool = setting(False, "kept for older configs: secret DP noise also in "
                               "simulation (as reproducible_noise=false); secret noise is always "
                               "hardened against floating-point attacks")
    reproducible_noise: bool | None = setting(None, "null: reproducible DP noise in simulation, "
                                              "secret on real SuperNodes; true: seeded by what "
                                              "the server knows (unsafe outside experiments); "
                                              "false: secret")
    publish_participation: bool = setting(False, "client: also write participation.csv, which "
                                          "clients each round sampled; epsilon then does NOT "
                                          "hold against whoever reads it (the accounting "
                                          "assumes the sample is secret)")

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None

    @property
    def record_level(self) -> bool:
        """DP-SGD on every client (the clients plan, account and noise)."""
        return self.enabled and self.mode == "record"

    @property
    def client_level(self) -> bool:
        """DP-FedAvg: the server clips each client's update and noises the sum."""
        return self.enabled and self.mode == "client"

    @property
    def noise(self) -> str:
        """Where the clients' DP randomness comes from (``fedlora.privacy.randomness``): ``"secret"``
        unless reproducible noise was asked for, or chosen by a simulation launcher
        (``resolve_noise``)."""
        return "reproducible" if self.reproducible_noise is True else "secret"


@dataclass(frozen=True)
class RayConfig:
    """Where ``python -m fedlora.simulate`` runs its clients (README: multi-node simulation)."""

    address: str | None = setting(None, "simulation only. null: start a local Ray instance | "
                                  "auto: join the cluster `ray start` made this machine part of | "
                                  "HOST:PORT: join the cluster whose head listens there")

    def __post_init__(self):
        if self.address is None or self.address == "auto":
            return
        host, _, port = self.address.rpartition(":")
        if not host or "://" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"ray.address={self.address!r} is not auto or HOST:PORT; give the "
                              "head's address as `ray start --head --port=PORT` prints it "
                              "(e.g. ray.address=10.0.0.5:6379)")


@dataclass(frozen=True)
class ExportConfig:
    """The fine-tuned model a run writes at its end (``fedlora.model.export``, docs/results.md)."""

    merge: bool = setting(False, "also write DIR/merged/: the base model with the adapter folded "
                          "into its weights (always, instead of DIR/adapter/, when the method "
                          "moved the base weights)")


# The sections of RunConfig that are dataclasses of their own (besides data and the methods').
SECTIONS = {"partition": PartitionConfig, "participation": ParticipationConfig,
            "fedau": FedAUConfig, "faults": FaultsConfig, "dp": DPConfig,
            "ray": RayConfig, "export": ExportConfig, "eval": EvalSpec}
# Where a run writes, not what it computes (``fedlora.run.cli``): accepted, never part of RunConfig.
PLACEMENT_KEYS = ("out", "resume")


@dataclass(frozen=True)
class RunConfig:
    strategy: str | None = setting(None, "the federated LoRA method: the name a file "
                                   "strategies/<name>.py registers (docs/algorithms.md); null: "
                                   "the strategies package's DEFAULT_STRATEGY")
    task: str | None = setting(None, "what the model learns, a file in fedlora/tasks/: topic "
                               "(embedded classification) | classification (data.path) | "
                               "arithmetic (embedded generation) | sft (data.path); null: "
                               "classification if data.path/data.name is set, else topic")
    model: str | None = setting(None, "minilm (embedded all-MiniLM-L6-v2) | smollm2 (embedded "
                                "SmolLM2-135M-Instruct) | a Hugging Face id / local model folder; "
                                "null: the task's default (classification: minilm, generation: "
                                "smollm2)")
    rank: int | None = setting(None, "adapter rank; null: the method's default (with "
                               "client_ranks: their largest)", check=POSITIVE)
    client_ranks: tuple[int, ...] = setting((), "clients of different ranks: partition p trains "
                                            "at client_ranks[p % len], e.g. [2,4,8,16]; the "
                                            "global adapter has the largest rank and every "
                                            "client the scale alpha / rank; empty: every client "
                                            "at rank (docs/algorithms.md)")
    alpha: float | None = setting(None, "LoRA scale s = alpha / rank; null: the method's default",
                                  check=POSITIVE)
    targets: tuple[str, ...] = setting((), "Linear layers to adapt; empty: peft's default for "
                                       "the architecture")
    clients: int = setting(100, "total clients (Flower SuperNodes)", check=POSITIVE)
    clients_per_round: int | None = setting(None, "clients sampled per round; null: the "
                                            "task's default, at most clients", check=POSITIVE)
    rounds: int | None = setting(None, "training rounds; null: the task's default "
                                 "(docs/configuration.md)", check=POSITIVE)
    local_steps: int | None = setting(None, "optimiser steps per client per round; null: the "
                                      "task's default", check=POSITIVE)
    batch_size: int | None = setting(None, "examples per local step; null: the task's default",
                                     check=POSITIVE)
    lr: float | None = setting(None, "client learning rate; null: the method's default (for "
                               "AdamW)", check=POSITIVE)
    head_lr: float | None = setting(None, "the learning rate of a classifier's new head (the "
                                    "rest trains at lr; same schedule); null: lr. Under DP-SGD "
                                    "with optimizer=sgd the head needs a far larger step than the "
                                    "adapters, whose noise a large lr turns into weight damage",
                                    check=POSITIVE)
    optimizer: str = setting("adamw", "the clients' optimiser, fresh each round: adamw | sgd "
                             "(plain SGD: under DP-SGD it does not rescale the noise per "
                             "coordinate as AdamW does; set lr, the defaults are AdamW's)",
                             choices=OPTIMIZERS)
    lr_schedule: str = setting("cosine", "cosine: decays over rounds to 0.1 lr in the last round "
                               "| constant", choices=LR_SCHEDULES)
    max_length: int | None = setting(None, "tokens per example (dynamic padding below that); "
                                     "null: the task's default (classification 32, generation "
                                     "192)", check=POSITIVE)
    seed: int = setting(0, "seed of sampling, partitions and initialisation")
    eval_every: int | None = setting(None, "server-side evaluation every this many rounds (and "
                                     "the last); null: the task's default",
                              check=POSITIVE)
    device: str = setting("cpu", "cpu | cuda", choices=DEVICES)
    client_cpus: float = setting(1.0, "Ray CPUs per client (also torch threads per client)",
                                 check=POSITIVE)
    client_gpus: float = setting(0.0, "Ray GPUs per client, fractional (device=cuda)",
                                 check=NONNEGATIVE)
    precision: str = setting("auto", "auto | fp32 | bf16: torch.autocast to bfloat16 around "
                             "the clients' forward/backward and the server's evaluation "
                             "(adapters, optimiser state, DP clipping and aggregation stay fp32); "
                             "auto: bf16 where the device has fast bf16 (a CUDA GPU with bf16, "
                             "a CPU with AMX or AVX-512 BF16), fp32 elsewhere, decided by each "
                             "process for its own hardware (summary.json: the server's)",
                             choices=PRECISIONS)
    grad_checkpointing: bool = setting(False, "recompute activations in the backward pass "
                                       "(Hugging Face gradient checkpointing, non-reentrant): "
                                       "less memory, about one more forward per step")
    quantization: int | None = setting(None, "4: the base model's Linear weights in 4-bit NF4 "
                                       "(bitsandbytes, device=cuda only; adapters stay fp32); "
                                       "null: full precision", choices=QUANTIZATIONS)
    weighting: str = setting("samples", "client weights: samples (n_k / sum n) | uniform (1/K) | "
                             "fedau (omega_k / N)", choices=WEIGHTINGS)
    server_lr: float = setting(1.0, "eta in x <- x + eta sum_k c_k (x_k - x)", check=POSITIVE)
    min_clients: int = setting(1, "a round with fewer valid replies is not aggregated",
                               check=POSITIVE)
    client_batch: int = setting(1, "simulation: a node trains up to this many of a round's "
                                "clients together, rows of all of them in one pass through one "
                                "copy of the base model, each with its own adapter factors "
                                "(under record-level DP its own clipping, noise and "
                                "accountant; docs/design/client-batching.md); 1: one client at "
                                "a time",
                                check=POSITIVE)
    client_hosts: int | None = setting(None, "simulation: virtual SuperNodes that host the clients "
                                       "(partition p on node p mod client_hosts; a node's clients "
                                       "keep their state in its Context.state); null: one node "
                                       "per client if client_batch=1, else "
                                       "ceil(clients_per_round / client_batch)", check=POSITIVE)
    round_timeout: float = setting(3600.0, "seconds the server waits for a round's replies",
                                   check=POSITIVE)
    max_update_norm: float = setting(1e6, "a reply whose update moves the global state further "
                                     "than this is rejected: the L2 norm of (update - global) "
                                     "over its trained tensors jointly; far above any honest "
                                     "update, it stops a node that sends huge values",
                                     check=POSITIVE)
    checkpoint_every: int = setting(1, "write DIR/checkpoint.pt every this many rounds (and the "
                                    "last); 0: never", check=NONNEGATIVE)
    verbose: bool = setting(False, "Flower and Ray logs on the console")
    tracking: str | None = setting(None, "also log every results row (scores, losses, bytes, "
                                   "epsilon, lr) and the config to tensorboard (DIR/tensorboard) "
                                   "| wandb (offline in DIR/wandb unless WANDB_MODE is set) | "
                                   "mlflow (file store DIR/mlruns unless MLFLOW_TRACKING_URI is "
                                   "set); null: off", choices=TRACKERS)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    fedau: FedAUConfig = field(default_factory=FedAUConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    # Every registered method's settings by name (each method's ``<name>.*`` section).
    methods: dict = field(default_factory=dict)

    @property
    def settings(self):
        """The chosen method's settings (None for a method without any)."""
        return self.methods.get(self.strategy)

    def model_spec(self, num_labels: int) -> ModelSpec:
        return ModelSpec(name=self.model, num_labels=num_labels, task=self.task, rank=self.rank,
                         alpha=self.alpha, targets=self.targets,
                         latent=get_method(self.strategy).server.latent, init_seed=self.seed,
                         precision=self.precision, grad_checkpointing=self.grad_checkpointing,
                         quantization=self.quantization)

    @property
    def hosts(self) -> int | None:
        """How many simulated SuperNodes host the clients (``client_hosts``, resolved); None:
        one node per client (the engine without hosts)."""
        if self.client_hosts is not None:
            return self.client_hosts
        if self.client_batch == 1:
            return None
        return min(self.clients, -(-self.clients_per_round // self.client_batch))

    def task_spec(self) -> Task:
        """The task of this run with its data and evaluation settings (``fedlora.tasks``)."""
        return make_task(self.task, self.data, self.eval)

    def to_dict(self) -> dict:
        """Plain values in the command line's layout (``config.yaml``): every section nested,
        each method's settings as its own top-level section."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["client_ranks"] = list(self.client_ranks)
        out.update(out.pop("methods"))
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """Validate a nested config dict (Hydra's, resolved; Flower's run config, unflattened;
        a saved ``config.yaml``) and fill the method's defaults. The schema (``run_schema``)
        refuses unknown keys and values of the wrong type; the fields' rules and the rules
        relating keys are checked here."""
        keys = validated(run_schema(), _spelled_out(raw))
        strategy = keys.pop("strategy") or default_strategy()
        method = get_method(strategy)
        nested = {}
        for name, section_class in SECTIONS.items():
            if name == "dp":
                continue  # its own rules (``_dp``)
            nested[name] = build(section_class, keys.pop(name), name)
        nested["dp"] = _dp(keys.pop("dp"))
        nested["data"] = build(DataSpec, keys.pop("data"), "data")
        if nested["data"].path and nested["data"].name:
            raise ConfigError("data.path and data.name are both set; give one of them")
        nested["methods"] = {name: build(m.settings, keys.pop(name), name)
                             for name, m in methods().items() if m.settings is not None}
        nested["targets"] = tuple(keys.pop("targets"))
        nested["client_ranks"] = parse_client_ranks(keys.pop("client_ranks"), keys["rank"], strategy)
        for key in PLACEMENT_KEYS:
            keys.pop(key)
        task_class = get_task(str(keys.pop("task") or default_task(nested["data"])))
        cfg = build(cls, {**keys, **nested, "strategy": strategy, "task": task_class.name})
        sized = task_class.run_defaults  # what one run of this task costs on 2 CPU cores
        cfg = replace(cfg, model=cfg.model or task_class.default_model,
                      max_length=cfg.max_length or task_class.default_max_length,
                      rounds=cfg.rounds or sized["rounds"],
                      local_steps=cfg.local_steps or sized["local_steps"],
                      batch_size=cfg.batch_size or sized["batch_size"],
                      eval_every=cfg.eval_every or sized["eval_every"],
                      clients_per_round=cfg.clients_per_round or min(sized["clients_per_round"],
                                                                     cfg.clients))
        cfg.task_spec().check()
        return cfg._with_method_defaults(method.server.defaults)._checked()

    def _with_method_defaults(self, defaults: dict) -> "RunConfig":
        """Rank, alpha and lr left null take the method's defaults (the rank: the largest of
        ``client_ranks`` if given)."""
        rank = self.rank if self.rank is not None else \
            max(self.client_ranks) if self.client_ranks else defaults["rank"]
        return replace(self, rank=rank,
                       alpha=float(defaults["alpha_per_rank"] * rank) if self.alpha is None
                       else self.alpha,
                       lr=defaults["lr"] if self.lr is None else self.lr)

    def _checked(self) -> "RunConfig":
        """The rules that relate several keys."""
        check_federation(self.clients, self.clients_per_round, self.participation, self.weighting,
                         self.min_clients, self.dp)
        if self.device == "cuda" and self.client_gpus == 0:
            raise ConfigError("device=cuda needs client_gpus > 0 (e.g. client_gpus=0.25: four "
                              "clients share one GPU)")
        if self.client_gpus > 0 and self.device != "cuda":
            raise ConfigError(f"client_gpus={self.client_gpus} needs device=cuda; set device=cuda "
                              "or client_gpus=0")
        self._check_gpu_settings()
        problem = get_method(self.strategy).server.config_problem(self.settings, self.dp)
        if problem:
            raise ConfigError(problem)
        missing = missing_package(self.tracking) if self.tracking is not None else None
        if missing:
            raise ConfigError(f"tracking={self.tracking} needs the {missing} package; pip install "
                              f"{missing} (or fedlora's extra: pip install -e \".[tracking]\"), "
                              "or set tracking=null")
        if self.client_hosts is not None and self.client_hosts > self.clients:
            raise ConfigError(f"client_hosts={self.client_hosts} exceeds clients={self.clients}: a "
                              f"node would host no client; set client_hosts <= {self.clients}")
        if self.min_clients > self.clients_per_round and self.participation.name == "uniform":
            raise ConfigError(f"min_clients={self.min_clients} exceeds clients_per_round="
                              f"{self.clients_per_round}; set min_clients <= {self.clients_per_round}")
        return self

    def _check_gpu_settings(self) -> None:
        """Checkpointing and quantisation against the device, DP and the method (any precision
        works with DP: Opacus clips and noises in fp32, ``fedlora.privacy.randomness``)."""
        if self.dp.record_level and self.grad_checkpointing:
            raise ConfigError("grad_checkpointing=true with record-level DP (dp.epsilon): "
                              "Opacus' hooks would see every recomputed forward twice; set "
                              "grad_checkpointing=false or dp.mode=client")
        if self.quantization is None:
            return
        import importlib.util

        if self.device != "cuda":
            raise ConfigError(f"quantization={self.quantization} loads the base weights through "
                              "bitsandbytes, which needs a CUDA GPU; set device=cuda "
                              "client_gpus=<share> on a GPU machine, or quantization=null")
        if get_method(self.strategy).server.moves_base_weights:
            raise ConfigError(f"quantization={self.quantization}: strategy={self.strategy} adds "
                              "to the base weights, which are frozen 4-bit; set "
                              "quantization=null or choose another strategy")
        if self.export.merge:
            raise ConfigError(f"quantization={self.quantization}: export.merge=true would fold "
                              "the adapter into 4-bit base weights; set export.merge=false (the "
                              "adapter folder applies to the full-precision base model)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"quantization={self.quantization} needs the bitsandbytes package; "
                              "pip install bitsandbytes, or set quantization=null")

    @classmethod
    def from_saved(cls, saved: dict) -> "RunConfig":
        """The config a run saved in its ``config.yaml`` (``to_dict``'s layout, plus ``out``)."""
        return cls.from_dict(saved)


def parse_client_ranks(raw, rank, strategy: str) -> tuple[int, ...]:
    """``client_ranks`` (a list; Flower's run-config string "2,4,8" is split by
    ``_spelled_out`` first) as positive integers, checked against ``rank`` (the global rank:
    their largest) and the method, which must have a rule for clients of different ranks
    (``FederatedLoRA.rank_rule``)."""
    if not raw:
        return ()
    items = list(raw)
    try:
        ranks = tuple(int(str(r).strip()) for r in items)
    except ValueError:
        ranks = ()
    if not ranks or any(r <= 0 or str(r) != str(i).strip() for r, i in zip(ranks, items)):
        raise ConfigError(f"client_ranks={raw!r} is not a list of positive integers; give e.g. "
                          "client_ranks=[2,4,8,16]")
    if rank is not None and int(rank) != max(ranks):
        raise ConfigError(f"rank={rank} with client_ranks={list(ranks)}: the global adapter has "
                          f"the largest client rank; drop rank or set rank={max(ranks)}")
    server = get_method(strategy).server
    if server.rank_rule is None:
        supported = sorted(name for name, m in methods().items() if m.server.rank_rule is not None)
        raise ConfigError(f"strategy={strategy} has no rule for clients of different ranks "
                          f"(client_ranks={list(ranks)}); drop client_ranks or choose one of: "
                          f"{', '.join(supported)}")
    return ranks


def check_federation(clients: int, clients_per_round: int, participation: ParticipationConfig,
                     weighting: str, min_clients: int, dp: DPConfig) -> None:
    """The rules relating the keys a strategy takes (``RunConfig`` and a strategy's own
    arguments, ``fedlora.strategies.base.FederatedLoRA``): a one-line ``ConfigError``."""
    if clients_per_round > clients:
        raise ConfigError(f"clients_per_round={clients_per_round} exceeds clients="
                          f"{clients}; set clients_per_round <= {clients} or raise "
                          "clients")
    if dp.client_level and participation.name != "uniform":
        raise ConfigError(f"dp.mode=client samples each client with probability "
                          f"clients_per_round/clients (the accounting needs it), so "
                          f"participation={participation.name} cannot apply; use "
                          "participation=uniform")
    if dp.record_level and participation.name != "uniform":
        raise ConfigError(f"participation={participation.name} draws who trains from each "
                          "client's label histogram, which under DP does not leave the client "
                          "(and would tie who trains to its data); use participation=uniform or "
                          "drop dp.epsilon")
    if dp.client_level and min_clients > 1:
        raise ConfigError(f"min_clients={min_clients} with dp.mode=client would drop a round's "
                          "updates when too few clients were sampled, so one client could change "
                          "the release by more than dp.clip; set min_clients=1")
    if dp.client_level and weighting == "fedau":
        raise ConfigError("dp.mode=client weights every clipped update equally (its "
                          "sensitivity); weighting=fedau cannot apply: use weighting=uniform")
    if min_clients > clients_per_round and participation.name == "uniform":
        raise ConfigError(f"min_clients={min_clients} exceeds clients_per_round="
                          f"{clients_per_round}; set min_clients <= {clients_per_round}")


def run_schema() -> type:
    """Every key of the command line as one OmegaConf structured config: ``RunConfig``'s
    fields, its sections, each registered method's ``<name>.*`` section and where the run
    goes (``out``, ``resume``). Hydra's ConfigStore holds it (``fedlora.run.cli``), so Hydra
    refuses an unknown key or a value of the wrong type; ``from_dict`` validates any other dict
    against it too. Generated from the dataclasses, so a key and its default are written once."""
    return _run_schema(tuple(methods()))


@functools.cache
def _run_schema(method_names: tuple[str, ...]) -> type:
    own = {spec[0]: spec for spec in schema_fields(RunConfig) if spec[0] != "methods"}
    _, kind, default = own["strategy"]  # the run directory's name needs the resolved one
    own["strategy"] = ("strategy", kind, field(default=default_strategy(), metadata=default.metadata))
    sections = [*SECTIONS, "data"]  # after the top-level keys, in the command line's order
    specs = [spec for name, spec in own.items() if name not in sections]
    specs += [own[name] for name in sections]
    for name in method_names:
        settings_class = methods()[name].settings
        if settings_class is not None:
            specs.append((name, schema(settings_class), field(default_factory=schema(settings_class))))
    specs += [(key, str | None, field(default=None)) for key in PLACEMENT_KEYS]
    return make_dataclass("RunConfigKeys", specs)


def hydra_tree() -> dict:
    """Every key of the command line with its default (null: "the method's default" where the
    field says so), nested as the command line writes it: ``run_schema``'s defaults."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(run_schema()))


def _spelled_out(raw: dict) -> dict:
    """``raw`` with the short forms the schema does not take spelled out: a preset's name for
    its section (``partition: dirichlet``) and a list as Flower's run config writes it
    (``targets: "query,value"``)."""
    raw = dict(raw)
    for name, section_class in SECTIONS.items():
        if isinstance(raw.get(name), str) and any(f.metadata.get("names_section")
                                                  for f in fields(section_class)):
            raw[name] = {"name": raw[name]}
    for key in ("targets", "client_ranks"):  # Flower's run config: "query,value", "2,4,8"
        if isinstance(raw.get(key), str):
            raw[key] = [t.strip() for t in raw[key].strip("[] ").split(",") if t.strip()]
    return raw


def _dp(section: dict) -> DPConfig:
    section = dict(section)
    if section["epsilon"] == math.inf:
        section["epsilon"] = None  # inf: no DP (so a sweep can include the non-private run)
    dp = build(DPConfig, section, "dp")
    if dp.delta >= 1:
        raise ConfigError(f"dp.delta={dp.delta} must be < 1 (usually well below 1/n: 1e-5)")
    if dp.secure_rng and dp.reproducible_noise:
        raise ConfigError("dp.secure_rng=true draws secret noise, but dp.reproducible_noise=true "
                          "asks for noise the server can replay; drop one of them")
    if dp.epsilon is not None and dp.noise_multiplier is not None:
        raise ConfigError(f"dp.epsilon={dp.epsilon:g} and dp.noise_multiplier={dp.noise_multiplier:g} "
                          "are both set; give one (epsilon plans the noise, noise_multiplier "
                          "fixes it)")
    if dp.noise_multiplier is not None and dp.mode == "record":
        raise ConfigError("dp.noise_multiplier is for dp.mode=client; record-level clients plan "
                          "their noise from dp.epsilon")
    if dp.publish_participation and not dp.client_level:
        raise ConfigError("dp.publish_participation=true is for client-level DP (dp.mode=client "
                          "with dp.epsilon or dp.noise_multiplier); otherwise participation.csv "
                          "is always written: drop the key")
    return dp


def resolve_noise(cfg: RunConfig, deployment: bool) -> RunConfig:
    """``cfg`` with ``dp.reproducible_noise`` decided by where the run happens (each launcher
    calls this before the config reaches ``run_server``): left null, a simulation draws
    reproducible noise (bit-exact reruns and resume; ``secure_rng`` excepted) and a deployment
    secret noise. Only an explicit ``true`` gives a deployment reproducible noise."""
    if cfg.dp.reproducible_noise is not None:
        return cfg
    reproducible = not deployment and not cfg.dp.secure_rng
    return replace(cfg, dp=replace(cfg.dp, reproducible_noise=reproducible))


def check_deployment(cfg: RunConfig) -> None:
    """What a deployment cannot do (a one-line ``ConfigError`` before any process starts):
    host several clients on one node (a real SuperNode is one client)."""
    if cfg.client_batch > 1 or cfg.client_hosts is not None:
        raise ConfigError(f"client_batch={cfg.client_batch}, client_hosts={cfg.client_hosts}: a "
                          "real SuperNode is one client; set client_batch=1 and client_hosts=null "
                          "(they are for simulation)")


# --------------------------------------------------------------------------------------------
# What a client needs to know travels in every message's ConfigRecord, so the same ClientApp
# serves simulation and deployment without a config of its own.


def client_config(cfg: RunConfig, num_labels: int) -> dict:
    """The flat ConfigRecord values the server sends with every message (sections as dotted
    keys, ``eval.max_new_tokens``; null as "")."""
    return flatten_dict(run_config_values({
        "strategy": cfg.strategy, "task": cfg.task, "model": cfg.model,
        "num-labels": num_labels, "eval": asdict(cfg.eval),
        "rank": cfg.rank, "alpha": cfg.alpha, "targets": ",".join(cfg.targets),
        "latent": cfg.model_spec(num_labels).latent, "init-seed": cfg.seed,
        "data": asdict(cfg.data), "partition": asdict(cfg.partition),
        "seed": cfg.seed, "max-length": cfg.max_length, "device": cfg.device,
        "precision": cfg.precision, "grad-checkpointing": int(cfg.grad_checkpointing),
        "quantization": cfg.quantization or 0,
        "client-cpus": cfg.client_cpus, "local-steps": cfg.local_steps,
        "batch-size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
        "crash-prob": cfg.faults.crash_prob,
        **dp_client_config(cfg)}))


def from_record(section_class, record, section: str):
    """The settings dataclass of ``client_config``'s ``section.*`` keys (missing: defaults)."""
    flat = {key: None if value == "" else value for key, value in record.items()
            if key.startswith(section + ".")}
    return parse_section(section_class, unflatten_dict(flat).get(section), section)


def dp_client_config(cfg: RunConfig) -> dict:
    """The DP settings a client needs: ``dp-mode`` (record | client; absent without DP), by
    which it knows to send nothing about its data beyond what the mode accounts for, and under
    record-level DP what it needs to plan its noise multiplier on its own (``dp-epsilon`` 0:
    no DP-SGD): the most training steps it can take in the run (local steps x rounds:
    participation is not credited) and the examples of the method's one-time set-up release,
    if it has one."""
    if cfg.dp.client_level:  # it happens on the server; the client only keeps its data to itself
        return {"dp-epsilon": 0.0, "dp-mode": "client"}
    if not cfg.dp.record_level:
        return {"dp-epsilon": 0.0}
    setup_share = get_method(cfg.strategy).server.setup_examples_per_client(cfg.settings,
                                                                            cfg.clients_per_round)
    return {"dp-mode": "record",
            "dp-epsilon": cfg.dp.epsilon, "dp-delta": cfg.dp.delta, "dp-clip": cfg.dp.clip,
            "dp-accountant": cfg.dp.accountant, "dp-max-steps": cfg.local_steps * cfg.rounds,
            "dp-init-samples": setup_share, "dp-noise": cfg.dp.noise}


def scheduled_lr(lr: float, server_round: int, rounds: int, schedule: str) -> float:
    """The clients' learning rate in a round of ``rounds``: constant, or (``cosine``) decayed
    from ``lr`` in round 1 to ``0.1 * lr`` in the last round (a stable final model despite
    client drift)."""
    if schedule == "constant" or rounds == 1:
        return lr
    progress = (server_round - 1) / (rounds - 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def specs_from_client_config(record) -> tuple[ModelSpec, DataSpec]:
    """The model and data a client must build, from the server's ConfigRecord."""
    targets = tuple(t for t in str(record["targets"]).split(",") if t)
    model = ModelSpec(name=record["model"], num_labels=int(record["num-labels"]),
                      task=str(record["task"]), rank=int(record["rank"]), alpha=float(record["alpha"]), targets=targets,
                      latent=bool(record["latent"]), init_seed=int(record["init-seed"]),
                      precision=str(record.get("precision", "fp32")),
                      grad_checkpointing=bool(int(record.get("grad-checkpointing", 0))),
                      quantization=int(record.get("quantization", 0)) or None)
    return model, from_record(DataSpec, record, "data")


def task_from_client_config(record, data: DataSpec) -> Task:
    """The task a client serves, on ``data`` (the message's, or the node's own copy)."""
    return make_task(str(record["task"]), data, from_record(EvalSpec, record, "eval"))


def partition_from_client_config(record) -> PartitionConfig:
    return from_record(PartitionConfig, record, "partition")
