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

import math
from dataclasses import asdict, dataclass, field, fields, replace

from fedlora.tasks.data import DataSpec
from fedlora.core.errors import ConfigError
from fedlora.model.pretrained import ModelSpec
from fedlora.core.registry import default_strategy, get_method, methods
from fedlora.tasks import EvalSpec, Task, default_task, get_task, make_task
from fedlora.core.settings import (AT_MOST_ONE, BELOW_ONE, NONNEGATIVE, POSITIVE, defaults,
                                   parse_section, setting)

PARTITIONS = ("iid", "dirichlet", "pathological")
PARTICIPATIONS = ("uniform", "bernoulli", "markov", "cyclic")
WEIGHTINGS = ("samples", "uniform", "fedau")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
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
    secure_rng: bool = setting(False, "Opacus' secure_mode Gaussian (2n-sample draw against "
                               "floating-point attacks) from each node's secret; implies secret "
                               "noise")
    reproducible_noise: bool | None = setting(None, "null: reproducible DP noise in simulation, "
                                              "secret on real SuperNodes; true: seeded by what "
                                              "the server knows (unsafe outside experiments); "
                                              "false: secret")

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
    precision: str = setting("fp32", "fp32 | bf16: torch.autocast to bfloat16 around the "
                             "clients' forward/backward and the server's evaluation (weights "
                             "and optimiser state stay fp32; also runs on CPU)",
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
        a saved ``config.yaml``) and fill the method's defaults."""
        raw = dict(raw)
        registered = methods()
        sections = set(SECTIONS) | {"data"} | set(registered)
        known = {f.name for f in fields(cls)} - {"methods"} | sections | set(PLACEMENT_KEYS)
        for key in raw:
            if key not in known:
                raise ConfigError(f"'{key}' is not a fedlora setting; see fedlora/conf/config.yaml "
                                  "for the valid keys")
        strategy = raw.get("strategy") or default_strategy()
        method = get_method(strategy)
        nested = {}
        for name, section_class in SECTIONS.items():
            if name == "dp":
                continue  # its own rules (``_dp``)
            section = raw.get(name)
            if isinstance(section, str):  # partition=dirichlet, participation=markov
                section = {"name": section}
            nested[name] = parse_section(section_class, section, name)
        nested["dp"] = _dp(raw.get("dp"))
        nested["data"] = parse_section(DataSpec, raw.get("data"), "data")
        if nested["data"].path and nested["data"].name:
            raise ConfigError("data.path and data.name are both set; give one of them")
        nested["methods"] = {name: parse_section(m.settings, raw.get(name), name)
                             for name, m in registered.items() if m.settings is not None}
        targets = raw.get("targets") or ()
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        nested["targets"] = tuple(targets)
        nested["client_ranks"] = _client_ranks(raw.get("client_ranks"), raw.get("rank"), strategy)
        top = {k: v for k, v in raw.items() if k not in sections and k not in PLACEMENT_KEYS}
        task = raw.get("task") or default_task(nested["data"])
        task_class = get_task(str(task))
        cfg = parse_section(cls, top, "", replace={**nested, "strategy": strategy,
                                                     "task": task_class.name})
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
        if self.clients_per_round > self.clients:
            raise ConfigError(f"clients_per_round={self.clients_per_round} exceeds clients="
                              f"{self.clients}; set clients_per_round <= {self.clients} or raise "
                              "clients")
        if self.device == "cuda" and self.client_gpus == 0:
            raise ConfigError("device=cuda needs client_gpus > 0 (e.g. client_gpus=0.25: four "
                              "clients share one GPU)")
        if self.client_gpus > 0 and self.device != "cuda":
            raise ConfigError(f"client_gpus={self.client_gpus} needs device=cuda; set device=cuda "
                              "or client_gpus=0")
        self._check_gpu_settings()
        problem = get_method(self.strategy).server.config_problem(self)
        if problem:
            raise ConfigError(problem)
        if self.dp.client_level and self.participation.name != "uniform":
            raise ConfigError(f"dp.mode=client samples each client with probability "
                              f"clients_per_round/clients (the accounting needs it), so "
                              f"participation={self.participation.name} cannot apply; use "
                              "participation=uniform")
        if self.dp.client_level and self.weighting == "fedau":
            raise ConfigError("dp.mode=client weights every clipped update equally (its "
                              "sensitivity); weighting=fedau cannot apply: use weighting=uniform")
        if self.min_clients > self.clients_per_round and self.participation.name == "uniform":
            raise ConfigError(f"min_clients={self.min_clients} exceeds clients_per_round="
                              f"{self.clients_per_round}; set min_clients <= {self.clients_per_round}")
        return self

    def _check_gpu_settings(self) -> None:
        """Precision, checkpointing and quantisation against the device, DP and the method."""
        if self.dp.record_level and self.precision != "fp32":
            raise ConfigError(f"precision={self.precision} is not supported with record-level DP "
                              "(dp.epsilon: Opacus' per-example gradients run in fp32 here); set "
                              "precision=fp32 or dp.mode=client")
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


def _client_ranks(raw, rank, strategy: str) -> tuple[int, ...]:
    """``client_ranks`` as positive integers (a list, or "2,4,8" / "[2,4,8]" from a run config),
    checked against ``rank`` (the global rank: their largest) and the method, which must have a
    rule for clients of different ranks (``FederatedLoRA.rank_rule``)."""
    if raw is None or raw == "" or raw == []:
        return ()
    items = raw.strip("[] ").split(",") if isinstance(raw, str) else list(raw)
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


def hydra_tree() -> dict:
    """Every key of the command line with its default (null: "the method's default" where the
    field says so), nested as the command line writes it: the tree ``fedlora.run.cli`` gives Hydra.
    Generated from the dataclasses, so a key and its default are written once."""
    tree = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
            for f in fields(RunConfig) if f.name not in SECTIONS and f.name not in ("data", "methods")}
    tree["strategy"] = default_strategy()  # the run directory's name needs the resolved one
    for name, section_class in {**SECTIONS, "data": DataSpec}.items():
        tree[name] = defaults(section_class)
    for name, method in methods().items():
        if method.settings is not None:
            tree[name] = defaults(method.settings)
    tree.update({key: None for key in PLACEMENT_KEYS})
    return tree


def _dp(raw) -> DPConfig:
    section = dict(raw or {})
    epsilon = section.get("epsilon")
    try:
        if float(epsilon) == math.inf:
            section["epsilon"] = None  # inf: no DP (so a sweep can include the non-private run)
    except (TypeError, ValueError):
        pass  # None, or not a number (reported by parse_section)
    dp = parse_section(DPConfig, section, "dp")
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
    """What a deployment cannot do (a one-line ``ConfigError`` before any process starts): a
    label-correlated participation model under DP, since DP clients send no label histogram
    and the server does not hold their data to count it."""
    if cfg.dp.enabled and cfg.participation.name != "uniform":
        raise ConfigError(f"participation={cfg.participation.name} needs each client's label "
                          "histogram, which DP clients do not send on real SuperNodes; use "
                          "participation=uniform or drop dp.epsilon")


# --------------------------------------------------------------------------------------------
# What a client needs to know travels in every message's ConfigRecord, so the same ClientApp
# serves simulation and deployment without a config of its own.


def client_config(cfg: RunConfig, num_labels: int) -> dict:
    """The flat ConfigRecord values the server sends with every message."""
    return {"strategy": cfg.strategy, "task": cfg.task, "model": cfg.model,
            "num-labels": num_labels, **to_record(cfg.eval, "eval."),
            "rank": cfg.rank, "alpha": cfg.alpha, "targets": ",".join(cfg.targets),
            "latent": cfg.model_spec(num_labels).latent, "init-seed": cfg.seed,
            **to_record(cfg.data, "data."), **to_record(cfg.partition, "partition."),
            "seed": cfg.seed, "max-length": cfg.max_length, "device": cfg.device,
            "precision": cfg.precision, "grad-checkpointing": int(cfg.grad_checkpointing),
            "quantization": cfg.quantization or 0,
            "client-cpus": cfg.client_cpus, "local-steps": cfg.local_steps,
            "batch-size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
            "crash-prob": cfg.faults.crash_prob,
            **dp_client_config(cfg)}


def to_record(section, prefix: str) -> dict:
    """A settings dataclass as flat ConfigRecord values (``prefix + field``; None as "")."""
    return {prefix + k: "" if v is None else v for k, v in asdict(section).items()}


def from_record(section_class, record, prefix: str):
    """The settings dataclass ``to_record`` flattened (missing keys: the defaults)."""
    raw = {f.name: record[prefix + f.name] for f in fields(section_class) if prefix + f.name in record}
    return parse_section(section_class, {k: (None if v == "" else v) for k, v in raw.items()},
                         prefix.rstrip("."))


def dp_client_config(cfg: RunConfig) -> dict:
    """The DP settings a client needs to plan its noise multiplier on its own (0: no DP):
    the most training steps it can take in the run (local steps x rounds: participation is
    not credited) and the examples of the method's one-time set-up release, if it has one."""
    if not cfg.dp.record_level:  # client-level DP happens on the server
        return {"dp-epsilon": 0.0}
    setup_share = get_method(cfg.strategy).server.setup_examples_per_client(cfg)
    return {"dp-epsilon": cfg.dp.epsilon, "dp-delta": cfg.dp.delta, "dp-clip": cfg.dp.clip,
            "dp-accountant": cfg.dp.accountant, "dp-max-steps": cfg.local_steps * cfg.rounds,
            "dp-init-samples": setup_share, "dp-noise": cfg.dp.noise,
            "dp-secure-rng": int(cfg.dp.secure_rng)}


def round_lr(cfg: RunConfig, server_round: int, lr: float | None = None) -> float:
    """The clients' learning rate in a round: constant, or cosine-decayed from ``lr`` (default
    ``cfg.lr``) in round 1 to ``0.1 * lr`` in the last round (a stable final model despite
    client drift)."""
    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule == "constant" or cfg.rounds == 1:
        return lr
    progress = (server_round - 1) / (cfg.rounds - 1)
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
    return model, from_record(DataSpec, record, "data.")


def task_from_client_config(record, data: DataSpec) -> Task:
    """The task a client serves, on ``data`` (the message's, or the node's own copy)."""
    return make_task(str(record["task"]), data, from_record(EvalSpec, record, "eval."))


def partition_from_client_config(record) -> PartitionConfig:
    return from_record(PartitionConfig, record, "partition.")
