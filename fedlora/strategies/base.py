"""What every fedlora strategy shares: a thin coordinator of Flower's ``Strategy`` hooks.

A strategy holds the global adapter state as the ``ArrayRecord`` Flower passes between
``configure_train`` and ``aggregate_train``; a subclass says which parts its clients train
(``trained_parts``, or per round ``trained_parts_in``), which they keep between rounds
(``kept_parts``, ``additive_parts``: the record of who holds what is the coordinator's,
``fedlora.strategies.holdings``; the method moves a part's version, ``holdings.advance``, and
may say how a client catches up on it, ``catch_up``, or gets it back, ``restore``), what else
it sends down (``config_down``), how it aggregates (``aggregate``, calling
``fedlora.aggregation.maths``), and its per-matrix communication formula.
The base only orders the round; each job is a part with one purpose, composed here once so
that it works with every method:

* ``ClientSampler`` (``fedlora.aggregation.participation``): uniform sampling or a participation model;
* ``ClientWeighting`` (``fedlora.aggregation.participation``): ``c_k`` by samples, uniform or FedAU;
* ``ReplySchema`` (``fedlora.strategies.replies``): why a reply must be rejected (pure checks);
* ``NodeBook``: each node's partition and its size as described, who is being restored, which
  partitions trained;
* ``HeldParts`` (``fedlora.strategies.holdings``): which version of each kept part every client
  holds, keyed by partition id (what it was sent this round is committed on a valid reply);
* ``ServerPrivacy`` (``fedlora.privacy.accounting``): the record-level DP ledger around the round's
  messages; ``ClientLevelDP`` (``fedlora.privacy.client_level``): client-level DP on the round's updates.

A strategy takes explicit keyword arguments (``FederatedLoRA.__init__``: the federation, the
clients' learning rate, sampling and weighting, DP, the method's settings), so it runs in any
Flower ServerApp (``start``: Flower's loop after finding the nodes and the method's set-up
round; docs/flower-apps.md); fedlora's round loop builds it from a ``RunConfig``
(``from_config``).

One training round, in this order (``configure_train`` then ``aggregate_train``):
  1. sample this round's clients among those still within their privacy budget: exactly
     ``clients_per_round`` with the run's seeded RNG (``participation=uniform``), or those a
     participation model marks active (bernoulli, markov, cyclic);
  2. send each the tensors it needs (``payload_down``: the parts it trains that it does not
     keep, and every kept part it holds an old version of, through ``catch_up``; with what it
     held, ``restore``, on top for a node that lost its Context.state) and the client config:
     the round's learning rate, the parts it trains (``trained_parts_in``), ``config_down``
     and, under DP, the server's copy of its accountant; note what it will hold
     (``HeldParts.send``);
  3. clients train only those parts and reply with them (``fedlora.clients``); under DP each
     reports its accountant, taken into the ledger first, and one out of budget declines
     instead (never sampled again);
  4. reject replies that fail the reply schema (``fedlora.strategies.replies``): errors, keys,
     shapes or dtypes other than those sent, non-finite values, ``num-examples`` not a positive
     integer up to the node's described size, an update further than ``max_update_norm`` from
     the global state, a malformed DP accountant (logged with the reason and reported in
     ``RoundReport.rejected``; the global state never sees them; a node that says it lost its
     state is restored next time); a round with fewer than ``min_clients`` valid replies is
     not aggregated at all (never partially);
  5. book the valid replies: those nodes are whole again and their partitions have trained;
  6. weight the valid replies: ``c_k = n_k / sum n`` (samples), ``1/K`` (uniform) or
     ``omega_k / N`` (FedAU, whose estimator steps every round, also a round without replies);
  7. commit what each client was sent (``HeldParts.accept``; ``reject`` for the others);
  8. under client-level DP (``dp.mode=client``, ``fedlora.privacy.client_level.ClientLevelDP``) the valid
     updates become one pseudo-update, the previous value plus the noised mean of their clipped
     deltas, with weight 1 (clients were Poisson-sampled in step 1); a round without a valid
     update releases the noise alone, as an empty Poisson sample must;
  9. aggregate on deltas, ``x <- x + eta * sum_k c_k (x_k - x)`` (``aggregate``, with the
     previous global value as one more weighted "client" where that rule needs it), and report
     the round (``RoundReport``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Result, Strategy

from fedlora.model.adapters import factor_key, layer_names, part_of, state_at_rank
from fedlora.privacy.client_level import ClientLevelDP, client_level_dp
from fedlora.aggregation.maths import (sample_weights, server_step_weights, single_threaded,
                                       weighted_mean_states)
from fedlora.report.comm import RESTORE, STATE_LOST
from fedlora.config import (DPConfig, FedAUConfig, ParticipationConfig, RunConfig,
                            check_federation, parse_client_ranks, scheduled_lr)
from fedlora.core.errors import ConfigError
from fedlora.core.settings import build, check_value
from fedlora.aggregation.participation import ClientSampler, ClientWeighting, FedAUWeights
from fedlora.privacy.accounting import PrivacyLedger, ServerPrivacy
from fedlora.strategies.holdings import HeldParts
from fedlora.strategies.grid import GridExchange, describe_nodes, wait_for_nodes
from fedlora.strategies.replies import ReplySchema, TensorSpec, tensor_spec

log = logging.getLogger("fedlora")

@dataclass
class RoundReport:
    """One round's result. Unpacks as Flower's ``(ArrayRecord | None, MetricRecord | None)``:
    ``arrays`` is None when the round was not aggregated (the global state stays as it was)."""

    arrays: ArrayRecord | None = None
    train_loss: float | None = None  # the sample-weighted mean of the valid replies' loss
    # (None under DP: a DP client reports no un-noised loss)
    clients_trained: int = 0  # valid replies aggregated
    client_weight_sum: float = 0.0  # sum of c_k (1 but for FedAU)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    client_reports: list[dict] = field(default_factory=list)  # metrics of each valid reply
    declined: list[int] = field(default_factory=list)  # partitions out of DP budget now

    @property
    def metrics(self) -> MetricRecord | None:
        if self.arrays is None:
            return None
        loss = {} if self.train_loss is None else {"train_loss": self.train_loss}
        return MetricRecord({**loss, "clients_trained": self.clients_trained,
                             "client_weight_sum": self.client_weight_sum})

    # Flower's pair: ``arrays, metrics = report``, ``report[0]``, ``len(report) == 2``.
    def __iter__(self) -> Iterator:
        return iter((self.arrays, self.metrics))

    def __getitem__(self, index: int):
        return (self.arrays, self.metrics)[index]

    def __len__(self) -> int:
        return 2


@dataclass
class NodeBook:
    """Who is who among the nodes: each node's partition, each partition's number of examples
    as its node described it (the most a reply may claim), the nodes that lost their
    Context.state and are being restored, and the partitions whose node has replied validly.
    (What each client holds is ``HeldParts``'s, keyed by partition.)"""

    partition_of: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    examples: dict[int, int] = field(default_factory=dict)  # partition id -> described size
    restoring: set[int] = field(default_factory=set)
    partitions_trained: set[int] = field(default_factory=set)

    def node_of(self, partition_ids: list[int]) -> list[int]:
        by_partition = {pid: node for node, pid in self.partition_of.items()}
        return [by_partition[p] for p in partition_ids]

    def restarted(self, partition_of: dict[int, int]) -> None:
        """Nodes back with an empty Context.state (new node id -> partition id) take their
        partitions' places and are restored."""
        node_of = {pid: node for node, pid in partition_of.items()}
        replaced = {old for old, pid in self.partition_of.items() if pid in node_of}
        self.partition_of = {node: pid for node, pid in self.partition_of.items()
                             if pid not in node_of} | dict(partition_of)
        self.restoring = (self.restoring - replaced) | set(partition_of)

    def state_dict(self) -> dict:
        return {"partition_of": sorted(self.partition_of.items()),
                "partitions_trained": sorted(self.partitions_trained)}

    def load_state_dict(self, state: dict) -> None:
        self.partition_of = {int(node): int(pid) for node, pid in state["partition_of"]}
        self.partitions_trained = set(state["partitions_trained"])


class FederatedLoRA(Strategy):
    name: str = ""
    latent: bool = False  # LoRA-SB's R between A and B
    exact: bool = False  # the paper's promise: the global update is E_w of the clients' updates
    trained_parts: tuple[str, ...] = ("A", "B", "head")
    one_time_parts_down: frozenset[str] = frozenset()  # bytes of these parts count as one-time
    kept_parts: frozenset[str] = frozenset()  # parts a client keeps between rounds (Context.state)
    # kept quantities a client sums, not replaced (FedEx-LoRA's base delta): ``HeldParts.additive``
    additive_parts: frozenset[str] = frozenset()
    keeps_node_state = property(lambda self: bool(self.kept_parts))  # FedEx: also its base delta
    seeded_parts: frozenset[str] = frozenset()  # parts a client rebuilds from the shared init seed
    moves_base_weights: bool = False  # the method adds to W0 (``global_base_delta``)
    # Clients of different ranks (``client_ranks``, docs/algorithms.md). None: the method refuses
    # them. "pad": the global factors have the largest rank; a client is sent (and keeps) their
    # first r_k components, and its reply is zero-padded to the largest rank before
    # ``aggregate``. "stack": the same downloads, but ``aggregate`` takes each reply at its
    # own rank.
    rank_rule: str | None = None
    # Defaults for arguments left None (keys left null in the config): rank, LoRA scale
    # alpha/rank, client lr.
    defaults = {"rank": 8, "alpha_per_rank": 2.0, "lr": 1e-3}
    settings_class: type | None = None  # the method's settings dataclass (``register_strategy``)

    @classmethod
    def config_problem(cls, settings, dp: DPConfig) -> str | None:
        """A combination of the method's ``settings`` and ``dp`` it cannot run with, as a
        one-line ``ConfigError`` message (naming the key, the value and the fix); None: none."""
        return None

    @classmethod
    def setup_examples_per_client(cls, settings, clients_per_round: int) -> int:
        """Examples each client releases in the method's one-time set-up round (``initialize``)
        with these ``settings``, which DP must plan for besides training; 0: the method has
        no such release."""
        return 0

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        """Parameters one client uploads per round for one adapted m x n matrix."""
        raise NotImplementedError

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        """Parameters one client downloads per round for one adapted m x n matrix."""
        raise NotImplementedError

    @classmethod
    def params_in_round(cls, m: int, n: int, rank: int, server_round: int) -> tuple[int, int]:
        """(up, down) parameters for one adapted m x n matrix in training round ``server_round``
        of the steady state; a method whose messages alternate by round overrides it."""
        return cls.params_up(m, n, rank), cls.params_down(m, n, rank)

    def __init__(self, *, clients: int, rounds: int, head_keys: Iterable[str] = frozenset(),
                 clients_per_round: int | None = None, seed: int = RunConfig.seed,
                 rank: int | None = None, alpha: float | None = None,
                 lr: float | None = None, head_lr: float | None = None,
                 lr_schedule: str = RunConfig.lr_schedule,
                 participation: ParticipationConfig | None = None,
                 weighting: str = RunConfig.weighting, fedau_cutoff: int | None = FedAUConfig.cutoff,
                 server_lr: float = RunConfig.server_lr, min_clients: int = RunConfig.min_clients,
                 max_update_norm: float = RunConfig.max_update_norm,
                 dp: DPConfig | None = None, settings: object | None = None,
                 client_ranks: Iterable[int] = ()):
        """A strategy for any Flower ServerApp (``start``), or fedlora's round loop
        (``from_config``). Every argument is keyword-only; the defaults are fedlora's.

        The federation:
            clients: the nodes of the run, each serving one partition 0..clients-1 (its
                ``partition-id``); ``start`` waits until all are connected.
            rounds: training rounds: the learning-rate schedule decays over them and
                client-level DP plans its noise for them.
            head_keys: the state keys of the model's new head (a classifier's), trained and
                averaged beside the adapters; empty: none (a causal LM).
            clients_per_round: clients sampled per round (None: all of them).
            seed: seeds the sampling and client-level DP's noise (and, in fedlora's runs, the
                partitions, the shared adapter init and the clients' batches).
        The adapters (None: the method's ``defaults``):
            rank, alpha: the adapters' rank and LoRA scale ``s = alpha / rank``, as the
                clients' model has them (Fed-SB's initialisation and FedEx-LoRA's residual use
                them).
        What each sampled client is told (the rest of its settings, the model and the data,
        travel in the ``train_config`` given to ``start``):
            lr: the clients' learning rate in round 1 (None: the method's default).
            head_lr: the head's learning rate in round 1 (None: ``lr``).
            lr_schedule: ``cosine`` (decays to 0.1 lr in the last round) or ``constant``.
        Sampling and aggregation:
            participation: who takes part in a round (None: uniform, exactly
                ``clients_per_round``; ``ParticipationConfig(name="bernoulli", ...)``: FedAU's
                participation models, which need each node's label histogram).
            weighting: ``c_k`` of a valid reply: ``samples`` (n_k / sum n), ``uniform`` (1/K)
                or ``fedau`` (omega_k / N, cut off at ``fedau_cutoff`` absent rounds).
            server_lr: eta in ``x <- x + eta sum_k c_k (x_k - x)``.
            min_clients: a round with fewer valid replies is not aggregated.
            max_update_norm: a reply further than this from the global state is rejected.
        Privacy:
            dp: record-level DP-SGD (the clients noise; the server keeps the ledger) or
                client-level DP-FedAvg (the server clips and noises) (None: no DP).
        Clients of different ranks (methods with a ``rank_rule``, docs/algorithms.md):
            client_ranks: partition p trains at ``client_ranks[p % len]`` (empty: every
                client at ``rank``; given: ``rank`` defaults to their largest).
        The method:
            settings: the method's own settings dataclass (``settings_class``, e.g.
                ``FedSBSettings(init_samples=64)``; None: its defaults).
        """
        _check_arguments(self, clients=clients, rounds=rounds, clients_per_round=clients_per_round,
                         seed=seed, rank=rank, alpha=alpha, lr=lr, head_lr=head_lr,
                         lr_schedule=lr_schedule, participation=participation,
                         weighting=weighting, fedau_cutoff=fedau_cutoff, server_lr=server_lr,
                         min_clients=min_clients, max_update_norm=max_update_norm, dp=dp,
                         settings=settings, client_ranks=client_ranks)
        self.clients, self.rounds, self.seed = clients, rounds, seed
        self.clients_per_round = clients if clients_per_round is None else clients_per_round
        self.head_keys = frozenset(head_keys)
        self.client_ranks = tuple(client_ranks)
        self.rank = (max(self.client_ranks) if self.client_ranks else self.defaults["rank"]) \
            if rank is None else rank
        self.alpha = float(self.defaults["alpha_per_rank"] * self.rank) if alpha is None else alpha
        self.lr = self.defaults["lr"] if lr is None else lr
        self.head_lr, self.lr_schedule = head_lr, lr_schedule
        self.server_lr, self.min_clients, self.max_update_norm = server_lr, min_clients, max_update_norm
        # the method's own settings (None: a method without any)
        self.settings = settings if settings is not None or self.settings_class is None \
            else self.settings_class()
        dp = dp or DPConfig()
        self.sampler = ClientSampler(participation or ParticipationConfig(), clients,
                                     self.clients_per_round, seed)
        self.weighting = ClientWeighting(weighting, clients, fedau_cutoff)
        self.nodes = NodeBook()
        self.holdings = HeldParts(kept=frozenset(self.kept_parts),
                                  additive=frozenset(self.additive_parts),
                                  seeded=frozenset(self.seeded_parts))
        self.dp = (ServerPrivacy(dp.epsilon, dp.accountant, noise=dp.noise)
                   if dp.record_level else None)
        # Client-level DP: the server clips and noises the round's updates (step 6a).
        setup_releases = int(self.setup_examples_per_client(self.settings, self.clients_per_round) > 0)
        self.client_dp = (client_level_dp(dp, clients=clients, clients_per_round=self.clients_per_round,
                                          rounds=rounds, seed=seed, setup_releases=setup_releases)
                          if dp.client_level else None)
        if self.client_dp is not None:
            self.sampler.use_rate(self.client_dp.sample_rate, secret=dp.noise == "secret")
        self.server_round = 0
        self.current: dict[str, torch.Tensor] = {}  # global state sent this round
        self.setup_rejected: list[tuple[int, str]] = []  # (node id, reason) in ``initialize``
        self.previous_in_updates = False  # ``aggregate``'s last update is the previous state

    @classmethod
    def from_config(cls, cfg: RunConfig, head_keys: Iterable[str]) -> FederatedLoRA:
        """The strategy of fedlora's run config ``cfg``: the one place a ``RunConfig`` becomes
        a strategy's arguments (``head_keys``: the model's, ``AdaptedModel.head_keys``)."""
        return cls(clients=cfg.clients, rounds=cfg.rounds, head_keys=head_keys,
                   clients_per_round=cfg.clients_per_round, seed=cfg.seed, rank=cfg.rank,
                   alpha=cfg.alpha, lr=cfg.lr, head_lr=cfg.head_lr, lr_schedule=cfg.lr_schedule,
                   participation=cfg.participation, weighting=cfg.weighting,
                   fedau_cutoff=cfg.fedau.cutoff, server_lr=cfg.server_lr,
                   min_clients=cfg.min_clients, max_update_norm=cfg.max_update_norm, dp=cfg.dp,
                   settings=cfg.methods.get(cls.name),  # its own ``<name>.*`` section
                   client_ranks=cfg.client_ranks)

    # Read-only views of the parts, for reports and tests.

    @property
    def partition_of(self) -> dict[int, int]:
        return self.nodes.partition_of

    @property
    def restoring(self) -> set[int]:
        return self.nodes.restoring

    @property
    def fedau(self) -> FedAUWeights | None:
        return self.weighting.fedau

    @property
    def privacy(self) -> PrivacyLedger | ClientLevelDP | None:
        """The DP accounting (None without DP): record-level, each client's accountant and who
        declined; client-level, the run's. Both give ``max_epsilon()`` and ``report()``."""
        return self.dp.ledger if self.dp is not None else self.client_dp

    # -- hooks a method overrides -----------------------------------------------------------

    def trained_parts_in(self, server_round: int) -> tuple[str, ...]:
        """The parts clients train (and send back) in ``server_round``: ``trained_parts`` in
        every round unless a method alternates (e.g. B rounds and A rounds)."""
        return self.trained_parts

    def payload_down(self, node_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client receives: the parts it trains this round that it does not keep (their
        starting point), and each kept part it holds an old version of (``catch_up``)."""
        partition = self.nodes.partition_of[node_id]
        trained = self.trained_parts_in(self.server_round)
        payload = state_at_rank({k: v for k, v in state.items()
                                 if self.part(k) in trained and self.part(k) not in self.kept_parts},
                                self.client_rank(partition))
        for part in self.holdings.stale(partition, self.client_rank(partition)):
            payload.update(self.catch_up(part, partition, state))
        return payload

    def catch_up(self, part: str, partition: int, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """The tensors that bring ``partition`` from the version of kept ``part`` it holds
        (``self.holdings``) to the current one: by default the current value. A method whose
        kept quantity is a sum (``additive_parts``) sends the updates it missed."""
        return state_at_rank({k: v for k, v in state.items() if self.part(k) == part},
                             self.client_rank(partition))

    def restore(self, part: str, partition: int, state: dict[str, torch.Tensor],
                payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a client that lost its Context.state held of kept ``part``, on top of
        ``payload`` (which already carries the part where it was stale), and the config values
        that go with it: by default the current value (what it held, being up to date)."""
        return {k: v for k, v in self.catch_up(part, partition, state).items() if k not in payload}, {}

    def restore_down(self, node_id: int, state: dict[str, torch.Tensor],
                     payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """What a node that lost its Context.state needs on top of ``payload`` to train exactly
        as if it had kept it (``restore`` of each kept part), and the config that goes with it."""
        partition = self.nodes.partition_of[node_id]
        tensors, config = {}, {}
        for part in sorted(self.holdings.parts):
            part_tensors, part_config = self.restore(part, partition, state, payload)
            tensors.update(part_tensors)
            config.update(part_config)
        return tensors, config

    def config_down(self, node_id: int) -> dict:
        """Extra ConfigRecord values for one node (by default none)."""
        return {}

    def client_rank(self, partition: int) -> int:
        """The adapter rank ``partition`` trains at: ``client_ranks[partition % len]`` (or
        ``rank``), until the client reports another (``next-rank``, rank self-pruning)."""
        if partition in self.holdings.ranks:
            return self.holdings.ranks[partition]
        ranks = self.client_ranks
        return ranks[partition % len(ranks)] if ranks else self.rank

    def round_metrics(self) -> dict:
        """Values of the method's own for the next results row (by default none)."""
        return {}

    def aggregate(self, state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                  weights: list[float]) -> dict[str, torch.Tensor]:
        """The new global state: ``sum_j weights[j] * updates[j]`` for each trained tensor.

        ``updates`` are the clients' trained tensors, followed by the previous global values
        when the delta rule needs them (``fedlora.aggregation.maths.server_step_weights``)."""
        return {**state, **weighted_mean_states(updates, weights)}

    def global_base_delta(self) -> dict[str, torch.Tensor] | None:
        """What the server's model adds to each adapted layer's pretrained base weight
        (``{layer: m x n}``); None: the base weights never change (all methods but FedEx)."""
        return None

    def export_factors(self, state: dict[str, torch.Tensor]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each adapted layer's plain-LoRA factors ``{layer: (B, A)}`` whose ``s B A`` (same
        scale s = alpha / rank) is the layer's update in the global ``state``: what a peft
        adapter holds (``fedlora.model.export``). By default the state's own B and A."""
        return {layer: (state[factor_key(layer, "B")], state[factor_key(layer, "A")])
                for layer in layer_names(state)}

    def initialize(self, grid, arrays: ArrayRecord, exchange) -> ArrayRecord:
        """One-time setup before round 1 (e.g. Fed-SB's gradient initialisation)."""
        return arrays

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a restart needs, as plain Python values (JSON-able) in the base class;
        subclasses may add tensors (then save with ``torch.save``)."""
        state = {**self.nodes.state_dict(), "sampler": self.sampler.state_dict(),
                 "weighting": self.weighting.state_dict(), "holdings": self.holdings.state_dict()}
        if self.dp is not None:
            state["privacy"] = self.dp.state_dict()
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.nodes.load_state_dict(state)
        self.holdings.load_state_dict(state["holdings"])
        self.sampler.load_state_dict(state["sampler"])
        self.weighting.load_state_dict(state["weighting"])
        if self.dp is not None:
            self.dp.load_state_dict(state["privacy"])
        if self.client_dp is not None:
            self.client_dp.load_state_dict(state["client_dp"])

    # -- nodes ---------------------------------------------------------------------------------

    def part(self, key: str) -> str | None:
        return part_of(key, self.head_keys)

    def register_nodes(self, partition_of: dict[int, int],
                       label_histograms: dict[int, list[int]] | None = None,
                       examples: dict[int, int] | None = None) -> None:
        """The connected nodes (node id -> partition id), for the participation models each
        partition's label histogram (partition id -> counts per label) and, for the reply
        check, each partition's number of examples as described (partition id -> count)."""
        self.nodes.partition_of = dict(partition_of)
        self.nodes.examples = dict(examples or {})
        self.sampler.use_label_histograms(label_histograms)

    def nodes_restarted(self, partition_of: dict[int, int]) -> None:
        """Nodes that came back with an empty Context.state, under new ids (``partition_of``,
        new node id -> partition id): all of them after a server restart
        (``load_state_dict``), or SuperNodes that rejoined during a run. The record of who
        holds what is keyed by partition and stays as it is, so messages and byte counts stay
        those of an uninterrupted run; each node's next message also carries a ``RESTORE``
        record with what it lost (``restore``; counted apart, ``fedlora.report.comm.CommLedger``)."""
        self.nodes.restarted(partition_of)

    def sample(self, server_round: int) -> list[int]:
        """This round's node ids in partition order (step 1), reproducible from the seed."""
        eligible = sorted(self.nodes.partition_of.values())
        if self.dp is not None:  # clients out of privacy budget are never sampled again
            eligible = self.dp.eligible(eligible)
        return self.nodes.node_of(self.sampler.sample(server_round, eligible))

    def participation_matrix(self) -> np.ndarray:
        """Boolean [rounds, clients]: which partitions were sampled in rounds 1, 2, ..."""
        return self.sampler.participation_matrix()

    # -- the run in any Flower ServerApp ------------------------------------------------------

    def start(self, grid, initial_arrays: ArrayRecord, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Flower's round loop (``Strategy.start``), after the two things a fedlora strategy
        needs first: the run's nodes (it waits until all ``clients`` are connected and asks
        each for its partition, ``register_nodes``) and the method's one-time set-up round
        (``initialize``, e.g. Fed-SB's). ``train_config``: what fedlora's ClientApp reads from
        every message (the model, task, data and local training:
        ``fedlora.config.client_config``). ``num_rounds``: None or ``rounds``, which the
        learning-rate schedule and DP were planned for. Server-side evaluation
        (``evaluate_fn``) sees the global adapter state; FedEx-LoRA's model also adds
        ``global_base_delta()`` to its base weights."""
        if num_rounds is not None and num_rounds != self.rounds:
            raise ValueError(f"num_rounds={num_rounds} but the strategy was built with rounds="
                             f"{self.rounds} (its learning-rate schedule and DP plan span them); "
                             f"build it with rounds={num_rounds} or leave num_rounds out")
        config = dict(train_config or {})
        if not self.nodes.partition_of:
            self.find_nodes(grid, config)
        arrays = self.initialize(grid, initial_arrays, GridExchange(grid, config, timeout))
        result = super().start(grid, arrays, self.rounds, timeout, ConfigRecord(config),
                               evaluate_config, evaluate_fn)
        if not result.arrays:  # no round aggregated: the set-up round's state is the last
            result.arrays = arrays
        return result

    def find_nodes(self, grid, client_config: dict) -> None:
        """Wait for all ``clients`` nodes, ask each for its partition and register them (the
        nodes whose answer fails the reply schema are left out, as in fedlora's runs)."""
        nodes = describe_nodes(grid, wait_for_nodes(grid, self.clients), client_config,
                               self.clients)
        held = sorted(info["partition_id"] for info in nodes.values())
        if not held:
            raise RuntimeError("no node described itself: fedlora's ClientApp reads the model, "
                               "task and data from train_config; pass train_config=ConfigRecord("
                               "fedlora.config.client_config(...))")
        if len(set(held)) < len(held):
            raise RuntimeError(f"the {len(held)} nodes hold partitions {held[:12]}: each of "
                               f"0..{self.clients - 1} must be served by one node (its "
                               "node_config's partition-id)")
        self.register_nodes({node: info["partition_id"] for node, info in nodes.items()},
                            {info["partition_id"]: info["label_histogram"] for info in nodes.values()},
                            {info["partition_id"]: info["num_examples"] for info in nodes.values()})

    # -- the round -----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        """Steps 1 and 2: one train message per sampled node."""
        self.server_round = server_round
        self.current = arrays.to_torch_state_dict()
        self.holdings.pending = {}
        trained = self.trained_parts_in(server_round)
        messages = []
        for node_id in self.sample(server_round):
            partition_id = self.nodes.partition_of[node_id]
            restoring = node_id in self.nodes.restoring
            payload = self.payload_down(node_id, self.current)
            restore, restore_config = ({}, {}) if not restoring else \
                self.restore_down(node_id, self.current, payload)
            node_config = ConfigRecord({**config, "server-round": server_round,
                                        "lr": scheduled_lr(self.lr, server_round, self.rounds,
                                                           self.lr_schedule),
                                        "head-lr": scheduled_lr(self.head_lr or self.lr, server_round,
                                                                self.rounds, self.lr_schedule),
                                        "trained-parts": ",".join(trained),
                                        "keep-parts": ",".join(sorted(self.kept_parts)),
                                        "seeded-parts": ",".join(sorted(self.seeded_parts)),
                                        # a node that trained before must still hold its state
                                        "expect-state": int(self.keeps_node_state and not restoring
                                                            and partition_id in self.nodes.partitions_trained),
                                        # its own rank (client_ranks, or pruned since)
                                        **({"client-rank": self.client_rank(partition_id)}
                                           if self.client_ranks or partition_id in
                                           self.holdings.ranks else {}),
                                        **self.config_down(node_id), **restore_config,
                                        **(self.dp.outgoing(partition_id) if self.dp else {})})
            self.holdings.send(partition_id, self.client_rank(partition_id))
            content = RecordDict({"arrays": ArrayRecord(payload), "config": node_config})
            if restore:
                content[RESTORE] = ArrayRecord(restore)
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Steps 3 to 8: validate, weight and aggregate one round's replies. Call it every
        round, with no replies too; ``arrays`` is None if none is valid (the global state stays
        as it was), but under client-level DP, which releases noise in every round."""
        self.server_round = server_round
        report = RoundReport()
        replies = self.record_privacy(replies, report.declined)
        expected = {k: v for k, v in self.current.items()
                    if self.part(k) in self.trained_parts_in(server_round)}
        schemas: dict[int, ReplySchema] = {}  # one per client rank: what it was sent
        valid = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            partition = self.nodes.partition_of.get(node_id)
            rank = self.rank if partition is None else self.client_rank(partition)
            if rank not in schemas:
                sent = state_at_rank(expected, rank)
                schemas[rank] = ReplySchema(tensor_spec(sent), self.nodes.examples,
                                            accountant=self.dp is not None, reference=sent,
                                            max_update_norm=self.max_update_norm)
            reason = (schemas[rank].problem(reply, self.nodes.partition_of)
                      or next_rank_problem(reply, rank))
            if reason is None:
                valid.append(reply)
                continue
            report.rejected.append((node_id, reason))
            log.warning("round %d: rejected the update of node %s: %s", server_round, node_id, reason)
            if STATE_LOST in reason:  # restarted under the same id: restore it next time
                self.nodes.restoring.add(node_id)
        # Replies arrive in any order; aggregating in partition order makes the sums exact
        # from run to run.
        valid.sort(key=lambda r: self.nodes.partition_of[r.metadata.src_node_id])
        if 0 < len(valid) < self.min_clients:
            log.warning("round %d: only %d valid replies, fewer than min_clients=%d: the round "
                        "is not aggregated (the global state stays as it was)", server_round,
                        len(valid), self.min_clients)
            valid = []
        nodes = [r.metadata.src_node_id for r in valid]
        partitions = [self.nodes.partition_of[n] for n in nodes]
        self.nodes.restoring -= set(nodes)
        self.nodes.partitions_trained |= set(partitions)
        report.client_reports = [dict(r.content["metrics"]) for r in valid]
        num_examples = [int(r.content["metrics"]["num-examples"]) for r in valid]
        coefficients = self.weighting.coefficients(partitions, num_examples)
        for partition in partitions:
            self.holdings.accept(partition)
        self.holdings.end_round()  # the other messaged clients gave no valid reply
        trained_ranks = [self.client_rank(p) for p in partitions]
        next_ranks = [int(r.content["metrics"].get("next-rank", rank))
                      for r, rank in zip(valid, trained_ranks)]
        for partition, rank, next_rank in zip(partitions, trained_ranks, next_ranks):
            if next_rank != rank:  # the client pruned its rank: it trains at next_rank from now
                self.holdings.ranks[partition] = next_rank
        if not valid and (self.client_dp is None or server_round == 0):
            return report
        # A pruned client's components beyond its new rank are dropped; under "pad" (and under
        # client-level DP, whose deltas need one shape) replies are zero-padded to the global rank.
        updates = [state_at_rank(r.content["arrays"].to_torch_state_dict(), rank)
                   for r, rank in zip(valid, next_ranks)]
        if self.rank_rule == "pad" or self.client_dp is not None:
            updates = [state_at_rank(update, self.rank) for update in updates]
        normalised = self.weighting.normalised
        if self.client_dp is not None:  # one noised pseudo-update; the method post-processes it
            # (noise alone when no update arrived: skipping it would publish that none did)
            updates = [self.client_dp.private_update(expected, updates, server_round)]
            coefficients, normalised = [1.0], True
        weights, previous_weight = server_step_weights(coefficients, self.server_lr,
                                                       normalised=normalised)
        self.previous_in_updates = previous_weight != 0.0
        if self.previous_in_updates:
            updates.append({key: self.current[key] for key in updates[0]})
            weights.append(previous_weight)
        with single_threaded():
            new_state = self.aggregate(self.current, updates, weights)
        report.arrays = ArrayRecord(new_state)
        if self.client_dp is None and all("train_loss" in r.content["metrics"] for r in valid):
            # none under DP: record-level clients send none, client-level rows release none
            losses = sample_weights(num_examples)  # the reported loss is always the sample mean
            report.train_loss = sum(w * r.content["metrics"]["train_loss"]
                                    for w, r in zip(losses, valid))
        report.clients_trained = len(valid)
        report.client_weight_sum = sum(coefficients)
        return report

    def valid_setup_replies(self, replies: Iterable[Message], tensors: TensorSpec
                            ) -> list[Message]:
        """A method's set-up replies (``initialize``) that pass the reply schema for
        ``tensors`` (keys, shapes, finite values, ``num-examples``, the DP accountant; no norm
        bound: they are not updates of the global state), the DP ledger fed first as in a
        round; the others are logged and kept in ``setup_rejected`` (round 0's failures)."""
        schema = ReplySchema(tensors, self.nodes.examples, accountant=self.dp is not None)
        valid = []
        for reply in self.record_privacy(replies):
            reason = schema.problem(reply, self.nodes.partition_of)
            if reason is None:
                valid.append(reply)
                continue
            self.setup_rejected.append((reply.metadata.src_node_id, reason))
            log.warning("set-up: rejected the reply of node %s: %s", reply.metadata.src_node_id,
                        reason)
        return valid

    def private_setup(self, sums: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """A method's set-up release (``initialize``) under client-level DP: the clients' sums
        clipped and noised into one sum, charged to the run's accountant; as is otherwise."""
        return sums if self.client_dp is None else [self.client_dp.private_sum(sums)]

    def record_privacy(self, replies: Iterable[Message], declined: list[int] | None = None
                       ) -> list[Message]:
        """Step 3 under DP (``ServerPrivacy.incoming``): the replies to validate, less the
        clients that declined for lack of budget (appended to ``declined``)."""
        replies = list(replies)
        if self.dp is None:
            return replies
        kept, declined_now = self.dp.incoming(replies, self.nodes.partition_of)
        for partition_id in declined_now:
            log.info("round %d: client %d declined: its next round would exceed epsilon %g",
                     self.server_round, partition_id, self.dp.ledger.target_epsilon)
        if declined is not None:
            declined.extend(declined_now)
        return kept

    # fedlora evaluates the global model on the server (fedlora.run.server), never on clients.

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("%s: %s weighting, %s participation, server_lr %g%s", type(self).__name__,
                 self.weighting.rule, self.sampler.settings.name, self.server_lr,
                 f", DP epsilon {self.dp.ledger.target_epsilon:g}" if self.dp else "")


def next_rank_problem(reply: Message, rank: int) -> str | None:
    """Why a valid reply's ``next-rank`` (the rank a client trains at from its next round, after
    pruning its own) cannot be used, or None: it must be an integer from 1 to ``rank``."""
    if reply.has_error() or "metrics" not in reply.content.metric_records:
        return None
    value = reply.content["metrics"].get("next-rank")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                         and value == int(value) and 1 <= value <= rank):
        return None
    return f"'next-rank' is {value!r}, not an integer from 1 to the client's rank {rank}"


def _check_arguments(strategy: FederatedLoRA, **arguments) -> None:
    """A strategy's arguments by the rules of the config keys of the same names (one-line
    ``ConfigError``; the settings sections by their fields' rules), and the method's settings
    by their type."""
    rules = {f.name: f.metadata for f in fields(RunConfig)}
    rules["fedau_cutoff"] = next(f.metadata for f in fields(FedAUConfig) if f.name == "cutoff")
    for key, value in arguments.items():
        if value is not None and is_dataclass(value):
            build(type(value), asdict(value), key)
        elif value is not None and key in rules:
            check_value(value, rules[key], key)
    settings, expected = arguments["settings"], strategy.settings_class
    if settings is not None and (expected is None or type(settings) is not expected):
        raise TypeError(f"{type(strategy).__name__} takes settings="
                        f"{expected.__name__ + '(...)' if expected else 'None'}, not "
                        f"{type(settings).__name__}")
    clients_per_round = arguments["clients_per_round"] or arguments["clients"]
    check_federation(arguments["clients"], clients_per_round,
                     arguments["participation"] or ParticipationConfig(), arguments["weighting"],
                     arguments["min_clients"], arguments["dp"] or DPConfig())
    if arguments["client_ranks"]:
        parse_client_ranks(list(arguments["client_ranks"]), arguments["rank"], strategy.name)
    problem = strategy.config_problem(settings or (expected() if expected else None),
                                      arguments["dp"] or DPConfig())
    if problem:
        raise ConfigError(problem)
